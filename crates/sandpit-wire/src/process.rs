//! From an image's config and a request to the process to start: the one
//! merge the daemon, `sandpit run` and the agent share, so that they agree
//! on argv, environment and working directory.
//!
//! The rules are Kubernetes' (which map onto OCI's): a request's `command`
//! replaces the image's entrypoint *and* its cmd, `args` alone replace the
//! cmd; the request's environment goes over the image's; the request's
//! working directory wins over the image's.

/// `PATH` for a process whose environment sets none (Docker's and
/// containerd's default).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Merges `overrides` into `base`: a key set twice keeps its first position
/// and takes the last value (as Docker replaces image variables in place);
/// `PATH` is [`DEFAULT_PATH`] when neither sets it.
pub fn merge_env(
    base: &[(String, String)],
    overrides: &[(String, String)],
) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = Vec::with_capacity(base.len() + overrides.len() + 1);
    for (k, v) in base.iter().chain(overrides) {
        match env.iter_mut().find(|(key, _)| key == k) {
            Some(slot) => slot.1.clone_from(v),
            None => env.push((k.clone(), v.clone())),
        }
    }
    if !env.iter().any(|(k, _)| k == "PATH") {
        env.push(("PATH".into(), DEFAULT_PATH.into()));
    }
    env
}

/// What an image's config says about its process (OCI `config`).
#[derive(Debug, Clone, Copy, Default)]
pub struct ImageProcess<'a> {
    /// OCI `Entrypoint`.
    pub entrypoint: &'a [String],
    /// OCI `Cmd`.
    pub cmd: &'a [String],
    /// OCI `Env`, `K=V` entries; an entry without `=` is `K` with an empty
    /// value.
    pub env: &'a [String],
    /// OCI `WorkingDir`; empty means `/`.
    pub working_dir: &'a str,
}

/// What a request changes about the image's process.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessOverrides<'a> {
    /// The executable: replaces the image's entrypoint and its cmd.
    pub command: Option<&'a str>,
    /// Arguments: after `command` when set, else replace the image's cmd.
    pub args: &'a [String],
    /// Added to the image's environment; a key already there takes this value.
    pub env: &'a [(String, String)],
    /// The working directory; `None` or empty: the image's.
    pub working_dir: Option<&'a str>,
}

/// The process to start.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Process {
    /// Program and arguments; empty when neither image nor request name one.
    pub argv: Vec<String>,
    /// The complete environment, `PATH` included.
    pub env: Vec<(String, String)>,
    /// The working directory; never empty.
    pub cwd: String,
}

/// Applies `req` to `image` (see the module's rules).
pub fn resolve(image: &ImageProcess<'_>, req: &ProcessOverrides<'_>) -> Process {
    let argv = match (req.command, req.args.is_empty()) {
        (Some(c), _) => std::iter::once(c.to_owned())
            .chain(req.args.iter().cloned())
            .collect(),
        (None, false) => image.entrypoint.iter().chain(req.args).cloned().collect(),
        (None, true) => image.entrypoint.iter().chain(image.cmd).cloned().collect(),
    };
    let image_env: Vec<(String, String)> = image
        .env
        .iter()
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) => (k.to_owned(), v.to_owned()),
            None => (kv.clone(), String::new()),
        })
        .collect();
    let cwd = [req.working_dir.unwrap_or_default(), image.working_dir]
        .into_iter()
        .find(|d| !d.is_empty())
        .unwrap_or("/")
        .to_owned();
    Process {
        argv,
        env: merge_env(&image_env, req.env),
        cwd,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn strings(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    // From the agent's spawn tests, where merge_env lived.
    #[test]
    fn env_overrides_and_default_path() {
        let env = merge_env(&kv(&[("A", "1"), ("B", "2")]), &kv(&[("B", "3")]));
        assert_eq!(env, kv(&[("A", "1"), ("B", "3"), ("PATH", DEFAULT_PATH)]));
        let env = merge_env(&kv(&[("PATH", "/x")]), &[]);
        assert_eq!(env, kv(&[("PATH", "/x")]));
    }

    #[test]
    fn an_override_keeps_the_position_of_the_key() {
        let env = merge_env(
            &kv(&[("A", "1"), ("B", "2"), ("A", "again")]),
            &kv(&[("A", "3"), ("PATH", "/p"), ("C", "4")]),
        );
        assert_eq!(
            env,
            kv(&[("A", "3"), ("B", "2"), ("PATH", "/p"), ("C", "4")])
        );
        assert_eq!(merge_env(&[], &[]), kv(&[("PATH", DEFAULT_PATH)]));
    }

    // The assertions of the daemon's `launch_spec_follows_kubernetes_semantics`
    // (sandpit-server's manager tests), on the shared implementation.
    #[test]
    fn resolve_follows_kubernetes_semantics() {
        let (entrypoint, cmd) = (strings(&["/entry"]), strings(&["default-arg"]));
        let env = strings(&["LANG=C.UTF-8", "HOME=/root"]);
        let image = ImageProcess {
            entrypoint: &entrypoint,
            cmd: &cmd,
            env: &env,
            working_dir: "/app",
        };
        let base = ProcessOverrides::default();
        let argv = |r: &ProcessOverrides<'_>| resolve(&image, r).argv;
        assert_eq!(argv(&base), ["/entry", "default-arg"]);
        let x = strings(&["x"]);
        let args_only = ProcessOverrides { args: &x, ..base };
        assert_eq!(argv(&args_only), ["/entry", "x"]);
        let sh_args = strings(&["-c", "true"]);
        let command = ProcessOverrides {
            command: Some("sh"),
            args: &sh_args,
            ..base
        };
        assert_eq!(argv(&command), ["sh", "-c", "true"]);

        let req_env = kv(&[("HOME", "/home/me"), ("X", "1")]);
        let full = ProcessOverrides {
            env: &req_env,
            working_dir: Some("/work"),
            ..base
        };
        let process = resolve(&image, &full);
        assert_eq!(
            process.env,
            [
                ("LANG".to_string(), "C.UTF-8".to_string()),
                ("HOME".into(), "/home/me".into()),
                ("X".into(), "1".into()),
                ("PATH".into(), DEFAULT_PATH.into()),
            ]
        );
        assert_eq!(process.cwd, "/work");
        assert_eq!(resolve(&image, &base).cwd, "/app");
        let bare = ImageProcess {
            working_dir: "",
            ..image
        };
        assert_eq!(resolve(&bare, &base).cwd, "/");
    }

    #[test]
    fn command_alone_drops_the_images_cmd_and_empty_dirs_fall_back() {
        let (entrypoint, cmd) = (strings(&["/entry"]), strings(&["default-arg"]));
        let image = ImageProcess {
            entrypoint: &entrypoint,
            cmd: &cmd,
            working_dir: "/app",
            ..Default::default()
        };
        let req = ProcessOverrides {
            command: Some("ls"),
            working_dir: Some(""),
            ..Default::default()
        };
        let p = resolve(&image, &req);
        assert_eq!(p.argv, ["ls"]);
        assert_eq!(p.cwd, "/app");
        // Nothing anywhere: no argv (the caller decides), "/" and PATH.
        assert_eq!(
            resolve(&ImageProcess::default(), &ProcessOverrides::default()),
            Process {
                argv: vec![],
                env: kv(&[("PATH", DEFAULT_PATH)]),
                cwd: "/".into(),
            }
        );
    }

    #[test]
    fn image_env_entries_without_a_value_are_empty() {
        let env = strings(&["EMPTY", "A=b=c", "PATH=/img", "=odd"]);
        let image = ImageProcess {
            env: &env,
            ..Default::default()
        };
        let over = kv(&[("EMPTY", "set")]);
        let p = resolve(&image, &ProcessOverrides::default());
        assert_eq!(
            p.env,
            kv(&[("EMPTY", ""), ("A", "b=c"), ("PATH", "/img"), ("", "odd")])
        );
        let p = resolve(
            &image,
            &ProcessOverrides {
                env: &over,
                ..Default::default()
            },
        );
        assert_eq!(p.env[0], ("EMPTY".to_string(), "set".to_string()));
    }
}
