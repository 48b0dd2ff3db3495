//! Pulls from a real registry (`docker-registry`, distribution 2.8) on
//! loopback, with images pushed by the helpers of `harness` or by `skopeo`.
//! Behind the `registry-tests` feature: these need the two binaries and root
//! (the store chowns and writes overlayfs whiteouts).
//!
//! Nothing here leaves loopback: the Docker Hub case points the registry
//! itself at a closed loopback port.

#![cfg(feature = "registry-tests")]

mod access;
mod harness;
mod hostile;
mod images;
