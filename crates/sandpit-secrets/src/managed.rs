//! The managed store: secrets encrypted at rest, one file per secret,
//! written by `sandpit secret set` and read by `sandpitd`.
//!
//! Layout: `<dir>/<name>.secret` (0600) holds a header (magic, format
//! version, the id of the key that sealed it, a random 24-byte nonce) and the
//! XChaCha20-Poly1305 ciphertext of a versioned record (a version byte, then
//! the value). The associated data is the header plus the store's and the
//! secret's names, so a file renamed to another name, copied to another
//! store or re-headed fails to open. The key is 32 random bytes in
//! `key_file` (0600, owned by the user that runs us), kept apart from `dir`.
//!
//! Key rotation ([`ManagedStore::rotate_key`]) writes the new key to
//! `<key_file>.next`, re-seals every secret under it one atomic rename at a
//! time, then renames `<key_file>.next` over `key_file`. Readers pick the
//! key by the id in each file's header and look at both files, so every
//! secret stays readable throughout; an interrupted rotation resumes with
//! the same new key when run again. Writers (set, rm, rotate) hold
//! `<dir>/.lock`.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::{SecretError, SecretValue, MAX_SECRET_BYTES};

const MAGIC: &[u8; 8] = b"SPSECRET";
/// Version of the file format (header and sealing).
const FORMAT_V1: u8 = 1;
/// Version of the sealed record (a version byte, then the value).
const RECORD_V1: u8 = 1;
const KEY_LEN: usize = 32;
const KEY_ID_LEN: usize = 8;
const NONCE_LEN: usize = 24;
const HEADER_LEN: usize = MAGIC.len() + 1 + KEY_ID_LEN + NONCE_LEN;
/// Poly1305's tag.
const TAG_LEN: usize = 16;
const SUFFIX: &str = ".secret";
/// Longest secret name.
pub const MAX_NAME_LEN: usize = 200;

/// Errors of a managed store. None carries a value.
#[derive(Debug, thiserror::Error)]
pub enum ManagedError {
    /// Not a name this store can hold.
    #[error("{name:?} is not a valid secret name: {why}")]
    BadName {
        /// The name.
        name: String,
        /// The rule it breaks.
        why: &'static str,
    },
    /// No such secret.
    #[error("no secret {0:?}")]
    NotFound(String),
    /// The value cannot be stored.
    #[error("the value {0}")]
    BadValue(&'static str),
    /// The key file is unusable.
    #[error("key file {path}: {why}")]
    Key {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// Secrets exist, but the key that sealed them does not.
    #[error("key file {path} is missing, but the store holds {count} secrets")]
    KeyMissing {
        /// The file.
        path: PathBuf,
        /// How many secrets.
        count: usize,
    },
    /// A secret's file does not open with this store's keys.
    #[error("secret {name:?} cannot be decrypted: {why}")]
    Sealed {
        /// The secret.
        name: String,
        /// Why.
        why: &'static str,
    },
    /// A file operation failed.
    #[error("{op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// On what.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

impl ManagedError {
    /// The resolution error for secret `name` of `store`.
    pub fn into_secret_error(self, store: &str, name: &str) -> SecretError {
        match self {
            ManagedError::BadName { why, .. } => SecretError::BadName {
                store: store.to_owned(),
                name: name.to_owned(),
                why,
            },
            ManagedError::NotFound(_) => SecretError::NotFound {
                store: store.to_owned(),
                name: name.to_owned(),
            },
            other => SecretError::Unusable {
                store: store.to_owned(),
                name: name.to_owned(),
                why: sandpit_errors::chain(&other),
            },
        }
    }
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ManagedError {
    let path = path.to_owned();
    move |source| ManagedError::Io { op, path, source }
}

/// Names of a managed store: `[A-Za-z0-9_][A-Za-z0-9._-]*`, at most
/// [`MAX_NAME_LEN`] bytes; one flat namespace (no `/`).
pub fn check_name(name: &str) -> Result<(), &'static str> {
    let first = name.bytes().next();
    if name.is_empty() {
        Err("empty")
    } else if name.len() > MAX_NAME_LEN {
        Err("longer than 200 bytes")
    } else if name.contains('/') {
        Err("a managed store's names contain no '/'")
    } else if !first.is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_')
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        Err("must be letters, digits, '.', '_' or '-', starting with a letter, digit or '_'")
    } else {
        Ok(())
    }
}

struct Key {
    bytes: Zeroizing<[u8; KEY_LEN]>,
    id: [u8; KEY_ID_LEN],
}

impl Key {
    fn new(bytes: Zeroizing<[u8; KEY_LEN]>) -> Self {
        let mut h = Sha256::new();
        h.update(b"sandpit managed secret key id\0");
        h.update(bytes.as_slice());
        let digest = h.finalize();
        let mut id = [0u8; KEY_ID_LEN];
        id.copy_from_slice(&digest[..KEY_ID_LEN]);
        Self { bytes, id }
    }

    fn generate() -> Self {
        let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
        getrandom::fill(bytes.as_mut_slice()).expect("the kernel's random source works");
        Self::new(bytes)
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new_from_slice(self.bytes.as_slice()).expect("32-byte key")
    }
}

/// Reads a key file: a regular file of exactly 32 bytes that only its
/// owner, the user we run as, may read. `None` when it does not exist.
fn load_key(path: &Path) -> Result<Option<Key>, ManagedError> {
    let bad = |why: String| ManagedError::Key {
        path: path.to_owned(),
        why,
    };
    let mut file = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io("open", path)(e)),
    };
    let meta = file.metadata().map_err(io("stat", path))?;
    if !meta.is_file() {
        return Err(bad("not a regular file".into()));
    }
    if meta.mode() & 0o077 != 0 {
        return Err(bad(format!(
            "mode {:04o} lets others read it; chmod 600",
            meta.mode() & 0o7777
        )));
    }
    if meta.uid() != nix::unistd::geteuid().as_raw() {
        return Err(bad(format!("owned by uid {}, not by us", meta.uid())));
    }
    if meta.len() != KEY_LEN as u64 {
        return Err(bad(format!(
            "{} bytes long; a key is {KEY_LEN}",
            meta.len()
        )));
    }
    let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
    file.read_exact(bytes.as_mut_slice())
        .map_err(io("read", path))?;
    Ok(Some(Key::new(bytes)))
}

fn random_suffix() -> String {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).expect("the kernel's random source works");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn sync_dir(dir: &Path) -> Result<(), ManagedError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("sync", dir))
}

/// Writes `data` to a new 0600 file next to `path`, flushed to disk; returns
/// the temporary file's path.
fn write_temp(path: &Path, data: &[u8]) -> Result<PathBuf, ManagedError> {
    let parent = path.parent().unwrap_or(Path::new("/"));
    let name = path
        .file_name()
        .map_or_else(|| "x".into(), |n| n.to_string_lossy().into_owned());
    let tmp = parent.join(format!(".{name}.tmp-{}", random_suffix()));
    let written = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&tmp)
        .and_then(|mut f| {
            f.write_all(data)?;
            f.sync_all()
        });
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(io("write", &tmp)(e));
    }
    Ok(tmp)
}

/// Puts `data` at `path` atomically (replacing what is there).
fn replace_file(path: &Path, data: &[u8]) -> Result<(), ManagedError> {
    let tmp = write_temp(path, data)?;
    if let Err(e) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(io("rename into", path)(e));
    }
    sync_dir(path.parent().unwrap_or(Path::new("/")))
}

/// Puts `data` at `path` unless something is there; whether it did.
fn create_file(path: &Path, data: &[u8]) -> Result<bool, ManagedError> {
    let tmp = write_temp(path, data)?;
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => {
            sync_dir(path.parent().unwrap_or(Path::new("/")))?;
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(io("create", path)(e)),
    }
}

/// Held while a writer changes the store.
#[derive(Debug)]
struct WriteLock(#[allow(dead_code)] nix::fcntl::Flock<File>);

/// One managed store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManagedStore {
    store: String,
    dir: PathBuf,
    key_file: PathBuf,
}

impl ManagedStore {
    /// The store `store` (its name is sealed into every secret) with its
    /// secrets in `dir` and its key in `key_file`.
    pub fn new(store: &str, dir: &Path, key_file: &Path) -> Self {
        Self {
            store: store.to_owned(),
            dir: dir.to_owned(),
            key_file: key_file.to_owned(),
        }
    }

    fn next_key_file(&self) -> PathBuf {
        let mut name = self.key_file.as_os_str().to_owned();
        name.push(".next");
        PathBuf::from(name)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}{SUFFIX}"))
    }

    /// Creates the directory (0700) and the key (32 random bytes, 0600)
    /// where they are missing, and checks the key. A missing key is only
    /// created for a store without secrets: a wrong `key_file` must not
    /// silently start a second key.
    pub fn init(&self) -> Result<(), ManagedError> {
        use std::os::unix::fs::DirBuilderExt;
        if !self.dir.is_dir() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&self.dir)
                .map_err(io("create", &self.dir))?;
        }
        if load_key(&self.key_file)?.is_some() {
            return Ok(());
        }
        let count = self.list()?.len();
        if count > 0 {
            return Err(ManagedError::KeyMissing {
                path: self.key_file.clone(),
                count,
            });
        }
        if let Some(parent) = self.key_file.parent() {
            if !parent.is_dir() {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(parent)
                    .map_err(io("create", parent))?;
            }
        }
        // Another process may create it at the same moment: then theirs is
        // the key.
        create_file(&self.key_file, Key::generate().bytes.as_slice())?;
        match load_key(&self.key_file)? {
            Some(_) => Ok(()),
            None => Err(ManagedError::Key {
                path: self.key_file.clone(),
                why: "vanished right after it was created".into(),
            }),
        }
    }

    fn lock(&self) -> Result<WriteLock, ManagedError> {
        let path = self.dir.join(".lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
            .map_err(io("open", &path))?;
        nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
            .map(WriteLock)
            .map_err(|(_, e)| io("lock", &path)(e.into()))
    }

    fn current_key(&self) -> Result<Key, ManagedError> {
        load_key(&self.key_file)?.ok_or_else(|| ManagedError::Key {
            path: self.key_file.clone(),
            why: "missing".into(),
        })
    }

    fn aad(&self, header: &[u8], name: &str) -> Vec<u8> {
        let mut aad = Vec::with_capacity(header.len() + self.store.len() + name.len() + 2);
        aad.extend_from_slice(header);
        aad.extend_from_slice(self.store.as_bytes());
        aad.push(0);
        aad.extend_from_slice(name.as_bytes());
        aad.push(0);
        aad
    }

    fn seal(&self, key: &Key, name: &str, value: &str) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).expect("the kernel's random source works");
        let mut header = Vec::with_capacity(HEADER_LEN);
        header.extend_from_slice(MAGIC);
        header.push(FORMAT_V1);
        header.extend_from_slice(&key.id);
        header.extend_from_slice(&nonce);
        let mut record = Zeroizing::new(Vec::with_capacity(1 + value.len()));
        record.push(RECORD_V1);
        record.extend_from_slice(value.as_bytes());
        let aad = self.aad(&header, name);
        let sealed = key
            .cipher()
            .encrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: &record,
                    aad: &aad,
                },
            )
            .expect("sealing a bounded record cannot fail");
        header.extend_from_slice(&sealed);
        header
    }

    /// The key id a sealed file names, after checking its header.
    fn header_key_id(name: &str, data: &[u8]) -> Result<[u8; KEY_ID_LEN], ManagedError> {
        let sealed = |why| ManagedError::Sealed {
            name: name.to_owned(),
            why,
        };
        if data.len() < HEADER_LEN + TAG_LEN || &data[..MAGIC.len()] != MAGIC {
            return Err(sealed("not a sealed secret"));
        }
        if data[MAGIC.len()] != FORMAT_V1 {
            return Err(sealed("unknown format version"));
        }
        let mut id = [0u8; KEY_ID_LEN];
        id.copy_from_slice(&data[MAGIC.len() + 1..MAGIC.len() + 1 + KEY_ID_LEN]);
        Ok(id)
    }

    fn open_sealed(&self, key: &Key, name: &str, data: &[u8]) -> Result<SecretValue, ManagedError> {
        let sealed = |why| ManagedError::Sealed {
            name: name.to_owned(),
            why,
        };
        let (header, body) = data.split_at(HEADER_LEN);
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&header[HEADER_LEN - NONCE_LEN..]);
        let aad = self.aad(header, name);
        let record = Zeroizing::new(
            key.cipher()
                .decrypt(
                    &XNonce::from(nonce),
                    Payload {
                        msg: body,
                        aad: &aad,
                    },
                )
                .map_err(|_| {
                    sealed("authentication failed (tampered, or sealed for another name or store)")
                })?,
        );
        match record.split_first() {
            Some((&RECORD_V1, value)) => std::str::from_utf8(value)
                .map(|v| SecretValue::new(v.to_owned()))
                .map_err(|_| sealed("not UTF-8")),
            _ => Err(sealed("unknown record version")),
        }
    }

    fn read_file(&self, name: &str) -> Result<Vec<u8>, ManagedError> {
        let path = self.path(name);
        let mut file = match OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open(&path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ManagedError::NotFound(name.to_owned()))
            }
            Err(e) => return Err(io("open", &path)(e)),
        };
        if !file.metadata().map_err(io("stat", &path))?.is_file() {
            return Err(ManagedError::NotFound(name.to_owned()));
        }
        let mut data = Vec::new();
        (&mut file)
            .take((HEADER_LEN + 1 + MAX_SECRET_BYTES + TAG_LEN) as u64 + 1)
            .read_to_end(&mut data)
            .map_err(io("read", &path))?;
        Ok(data)
    }

    /// The key that sealed `data`: the current one or, during a rotation,
    /// the next one.
    fn key_for(&self, name: &str, data: &[u8]) -> Result<Key, ManagedError> {
        let id = Self::header_key_id(name, data)?;
        // A rotation may rename the next key over the current one between
        // our two reads: look twice.
        for _ in 0..2 {
            for path in [self.key_file.clone(), self.next_key_file()] {
                if let Some(k) = load_key(&path)? {
                    if k.id == id {
                        return Ok(k);
                    }
                }
            }
        }
        Err(ManagedError::Sealed {
            name: name.to_owned(),
            why: "sealed under a key this store does not have",
        })
    }

    /// The value of `name`.
    pub fn get(&self, name: &str) -> Result<SecretValue, ManagedError> {
        check_name(name).map_err(|why| ManagedError::BadName {
            name: name.to_owned(),
            why,
        })?;
        let data = self.read_file(name)?;
        let key = self.key_for(name, &data)?;
        self.open_sealed(&key, name, &data)
    }

    /// Stores `value` as `name` (replacing it), creating the store and its
    /// key if needed.
    pub fn set(&self, name: &str, value: &SecretValue) -> Result<(), ManagedError> {
        check_name(name).map_err(|why| ManagedError::BadName {
            name: name.to_owned(),
            why,
        })?;
        if value.len() > MAX_SECRET_BYTES {
            return Err(ManagedError::BadValue("is larger than 65536 bytes"));
        }
        if value.expose().contains('\0') {
            return Err(ManagedError::BadValue("contains a NUL byte"));
        }
        self.init()?;
        let _lock = self.lock()?;
        let key = self.current_key()?;
        replace_file(&self.path(name), &self.seal(&key, name, value.expose()))
    }

    /// The names of the secrets, sorted.
    pub fn list(&self) -> Result<Vec<String>, ManagedError> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
            Err(e) => return Err(io("list", &self.dir)(e)),
        };
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io("list", &self.dir))?;
            let file_name = entry.file_name();
            let Some(name) = file_name.to_str().and_then(|n| n.strip_suffix(SUFFIX)) else {
                continue;
            };
            if check_name(name).is_ok() {
                names.push(name.to_owned());
            }
        }
        names.sort();
        Ok(names)
    }

    /// Removes `name`.
    pub fn remove(&self, name: &str) -> Result<(), ManagedError> {
        check_name(name).map_err(|why| ManagedError::BadName {
            name: name.to_owned(),
            why,
        })?;
        let _lock = self.lock()?;
        let path = self.path(name);
        match std::fs::remove_file(&path) {
            Ok(()) => sync_dir(&self.dir),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(ManagedError::NotFound(name.to_owned()))
            }
            Err(e) => Err(io("remove", &path)(e)),
        }
    }

    /// Re-seals every secret under a new key, then makes it the store's key
    /// (see the module's documentation); returns how many secrets were
    /// re-sealed. Run again after an interruption, it finishes the same
    /// rotation.
    pub fn rotate_key(&self) -> Result<usize, ManagedError> {
        let _lock = self.lock()?;
        let current = self.current_key()?;
        let next_path = self.next_key_file();
        let next = match load_key(&next_path)? {
            Some(k) => k,
            None => {
                let k = Key::generate();
                replace_file(&next_path, k.bytes.as_slice())?;
                k
            }
        };
        let mut resealed = 0;
        for name in self.list()? {
            let data = self.read_file(&name)?;
            let id = Self::header_key_id(&name, &data)?;
            if id == next.id {
                continue;
            }
            if id != current.id {
                return Err(ManagedError::Sealed {
                    name,
                    why: "sealed under a key this store does not have",
                });
            }
            let value = self.open_sealed(&current, &name, &data)?;
            replace_file(&self.path(&name), &self.seal(&next, &name, value.expose()))?;
            resealed += 1;
        }
        std::fs::rename(&next_path, &self.key_file).map_err(io("rename into", &self.key_file))?;
        sync_dir(self.key_file.parent().unwrap_or(Path::new("/")))?;
        Ok(resealed)
    }

    /// The key file (for messages).
    pub fn key_file(&self) -> &Path {
        &self.key_file
    }

    /// The directory (for messages).
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

#[cfg(test)]
#[path = "managed_tests.rs"]
mod tests;
