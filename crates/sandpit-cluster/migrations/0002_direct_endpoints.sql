-- A runner's direct data-plane endpoint (ConnectSandbox, docs/scale-out.md):
-- where clients reach it over mTLS, and the certificate it serves there,
-- which ConnectSandbox hands to clients as the CA to trust. NULL: the
-- runner offers none, and clients use the gateway.
ALTER TABLE runners
    ADD COLUMN direct_endpoint TEXT,
    ADD COLUMN direct_cert_pem TEXT;
