//! `[[pool]]`: warm pools, validated once at start-up into
//! [`PoolSettings`] (see `manager::pool` for what a pool holds).
//!
//! ```toml
//! [[pool]]
//! image = "python:3.11"   # required; as a create names it
//! size = 4                # sandboxes kept ready (1 to 64; default 2)
//! cpu = "1"               # the shape: a create asking for exactly this
//! memory = "1Gi"          #   (requests = limits) is served from the pool;
//!                         #   unset: the runner's default resources
//! ```
//!
//! A create is served from a pool when it fits the pool's shape: the same
//! image, resources, writable-layer size and network policy, no volumes, no
//! read-only root, and at most 1 MiB of files. Everything else (command,
//! environment, files, user, probe, labels, owner) is applied when the
//! pooled sandbox is claimed. Off by default: an idle sandbox costs memory
//! (reported as `sandpit_pool_memory_bytes`).

use serde::Deserialize;
use std::collections::HashSet;

use crate::config::ConfigError;
use sandpit_runtime::quantity::{parse_cpu_millis, parse_memory};

/// Most sandboxes one pool keeps ready.
pub const MAX_POOL_SIZE: usize = 64;
/// Most sandboxes all pools keep ready together.
pub const MAX_POOLED: usize = 256;

/// One `[[pool]]` as the file spells it.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilePool {
    image: Option<String>,
    size: Option<usize>,
    cpu: Option<String>,
    memory: Option<String>,
}

/// One pool, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolSettings {
    /// The image, as a create would name it.
    pub image: String,
    /// Sandboxes kept ready.
    pub size: usize,
    /// The CPU of the shape (a quantity: `"1"`, `"500m"`); `None`: the
    /// runner's default.
    pub cpu: Option<String>,
    /// The memory of the shape (`"1Gi"`); `None`: the runner's default.
    pub memory: Option<String>,
}

fn invalid(key: &'static str, index: usize, reason: impl std::fmt::Display) -> ConfigError {
    ConfigError::Invalid {
        key,
        reason: format!("pool {index}: {reason}"),
    }
}

/// Validates every `[[pool]]`.
pub fn resolve(pools: Vec<FilePool>) -> Result<Vec<PoolSettings>, ConfigError> {
    let mut out = Vec::with_capacity(pools.len());
    let mut seen = HashSet::new();
    let mut total = 0usize;
    for (i, p) in pools.into_iter().enumerate() {
        let image = p.image.map(|s| s.trim().to_owned()).unwrap_or_default();
        if image.is_empty() {
            return Err(invalid("pool.image", i, "required"));
        }
        let size = p.size.unwrap_or(2);
        if !(1..=MAX_POOL_SIZE).contains(&size) {
            return Err(invalid(
                "pool.size",
                i,
                format!("{size} is not between 1 and {MAX_POOL_SIZE}"),
            ));
        }
        total += size;
        if total > MAX_POOLED {
            return Err(invalid(
                "pool.size",
                i,
                format!("the pools hold more than {MAX_POOLED} sandboxes together"),
            ));
        }
        if let Some(cpu) = &p.cpu {
            parse_cpu_millis(cpu).map_err(|e| invalid("pool.cpu", i, format!("{cpu:?}: {e}")))?;
        }
        if let Some(memory) = &p.memory {
            parse_memory(memory)
                .map_err(|e| invalid("pool.memory", i, format!("{memory:?}: {e}")))?;
        }
        if !seen.insert((image.clone(), p.cpu.clone(), p.memory.clone())) {
            return Err(invalid(
                "pool.image",
                i,
                format!("a pool of {image} with this shape is configured already"),
            ));
        }
        out.push(PoolSettings {
            image,
            size,
            cpu: p.cpu,
            memory: p.memory,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pools(toml_text: &str) -> Result<Vec<PoolSettings>, ConfigError> {
        #[derive(Deserialize)]
        struct File {
            #[serde(default)]
            pool: Vec<FilePool>,
        }
        resolve(toml::from_str::<File>(toml_text).unwrap().pool)
    }

    fn reason(toml_text: &str) -> (String, String) {
        match pools(toml_text).unwrap_err() {
            ConfigError::Invalid { key, reason } => (key.to_owned(), reason),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn pools_are_off_unless_configured_and_sizes_default_to_two() {
        assert_eq!(pools("").unwrap(), vec![]);
        let p = pools("[[pool]]\nimage = \"python:3.11\"\n[[pool]]\nimage = \"busybox\"\nsize = 5\ncpu = \"500m\"\nmemory = \"256Mi\"\n").unwrap();
        assert_eq!(
            p,
            vec![
                PoolSettings {
                    image: "python:3.11".into(),
                    size: 2,
                    cpu: None,
                    memory: None
                },
                PoolSettings {
                    image: "busybox".into(),
                    size: 5,
                    cpu: Some("500m".into()),
                    memory: Some("256Mi".into())
                },
            ]
        );
    }

    #[test]
    fn bad_pools_name_the_field_and_the_pool() {
        assert_eq!(
            reason("[[pool]]\nsize = 1\n"),
            ("pool.image".into(), "pool 0: required".into())
        );
        let (key, why) = reason("[[pool]]\nimage = \"a\"\nsize = 0\n");
        assert_eq!(
            (key.as_str(), why.as_str()),
            ("pool.size", "pool 0: 0 is not between 1 and 64")
        );
        let (key, why) =
            reason("[[pool]]\nimage = \"a\"\n[[pool]]\nimage = \"b\"\ncpu = \"lots\"\n");
        assert_eq!(key, "pool.cpu");
        assert!(why.starts_with("pool 1: \"lots\""), "{why}");
        let (key, _) = reason("[[pool]]\nimage = \"a\"\nmemory = \"-1\"\n");
        assert_eq!(key, "pool.memory");
        let (key, why) = reason("[[pool]]\nimage = \"a\"\n[[pool]]\nimage = \"a\"\n");
        assert_eq!(key, "pool.image");
        assert!(why.contains("configured already"), "{why}");
        let many: String = (0..5)
            .map(|i| format!("[[pool]]\nimage = \"i{i}\"\nsize = 64\n"))
            .collect();
        let (key, why) = reason(&many);
        assert_eq!(key, "pool.size");
        assert!(
            why.starts_with("pool 4: the pools hold more than 256"),
            "{why}"
        );
    }

    #[test]
    fn unknown_keys_are_refused() {
        #[derive(Deserialize, Debug)]
        #[allow(dead_code)]
        struct File {
            pool: Vec<FilePool>,
        }
        assert!(toml::from_str::<File>("[[pool]]\nimage = \"a\"\nsizes = 3\n").is_err());
    }
}
