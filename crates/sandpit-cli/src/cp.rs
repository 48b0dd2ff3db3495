//! `sandpit cp SRC ID:DST` and `sandpit cp ID:SRC DST`, as `docker cp`
//! copies: a file through ReadFile/WriteFile (its mode carried over), a
//! directory or a file above the daemon's one-message limit as a stream
//! through StreamExec (`tar` or `cat` inside the sandbox), and `-` for a
//! tar archive on stdin or stdout.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use sandpit_proto::sandbox::v1 as pb;
use sandpit_proto::sandbox::v1::exec_stream_output::Stream as PbStream;
use sandpit_proto::sandbox::v1::exec_stream_request::Message as In;
use sandpit_proto::sandbox::v1::exec_stream_response::Message as Out;
use tokio::sync::mpsc;

use crate::remote::{self, Client, ServerArgs};

#[derive(Args, Debug)]
pub(crate) struct CpArgs {
    /// Source: a local path, `-` (a tar archive on stdin), or `ID:PATH`.
    src: String,
    /// Destination: a local path, `-` (a tar archive to stdout), or
    /// `ID:PATH`.
    dst: String,
}

/// One end of a copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Location {
    Local(PathBuf),
    /// `-`: a tar archive on stdin or stdout.
    Stdio,
    Sandbox {
        id: String,
        path: String,
    },
}

/// Docker's rule: `-` is stdio; a path starting with `/` or `.` is local
/// (so `./a:b` is a local file); otherwise `ID:PATH` names a sandbox's
/// path, relative ones from its `/`.
pub(crate) fn parse_location(s: &str) -> Result<Location> {
    if s == "-" {
        return Ok(Location::Stdio);
    }
    if s.is_empty() {
        bail!("empty path");
    }
    if s.starts_with('/') || s.starts_with('.') {
        return Ok(Location::Local(s.into()));
    }
    match s.split_once(':') {
        Some(("", _)) => bail!("{s:?}: no sandbox id before ':'"),
        Some((_, "")) => bail!("{s:?}: no path after ':'"),
        Some((id, path)) => {
            let path = if path.starts_with('/') {
                path.to_string()
            } else {
                format!("/{path}")
            };
            Ok(Location::Sandbox {
                id: id.to_string(),
                path,
            })
        }
        None => Ok(Location::Local(s.into())),
    }
}

/// The last component of a path (`/a/b/` -> `b`).
fn base_name(path: &str) -> Option<&str> {
    path.trim_end_matches('/')
        .rsplit('/')
        .next()
        .filter(|b| !b.is_empty() && *b != "." && *b != "..")
}

/// `path` and its parent as `tar -C` takes them.
fn split_parent(path: &str) -> (String, String) {
    let trimmed = path.trim_end_matches('/');
    match trimmed.rsplit_once('/') {
        Some(("", base)) => ("/".into(), base.into()),
        Some((parent, base)) => (parent.into(), base.into()),
        None => (".".into(), trimmed.into()),
    }
}

pub(crate) fn run(server: &ServerArgs, data_dir: &Path, args: CpArgs) -> Result<()> {
    let src = parse_location(&args.src)?;
    let dst = parse_location(&args.dst)?;
    let rt = crate::remote::runtime()?;
    rt.block_on(async {
        match (src, dst) {
            (Location::Sandbox { .. }, Location::Sandbox { .. }) => {
                bail!("copying between sandboxes is not supported: copy through a local path")
            }
            (Location::Sandbox { id, path }, to) => {
                let mut client = remote::connect(server, data_dir).await?;
                download(&mut client, &id, &path, to).await
            }
            (from, Location::Sandbox { id, path }) => {
                let mut client = remote::connect(server, data_dir).await?;
                upload(&mut client, from, &id, &path).await
            }
            _ => bail!("one of SRC and DST must be ID:PATH"),
        }
    })
}

/// The status's ErrorInfo reason, if any.
fn reason(status: &tonic::Status) -> String {
    use tonic_types::StatusExt;
    status
        .get_error_details()
        .error_info()
        .map(|i| i.reason.clone())
        .unwrap_or_default()
}

async fn upload(client: &mut Client, from: Location, id: &str, path: &str) -> Result<()> {
    let local = match from {
        Location::Stdio => {
            // A tar archive into the directory `path`, like `docker cp -`.
            let script = "cd -- \"$1\" && tar -x -f -";
            return run_script(
                client,
                id,
                script,
                &[path],
                Some(Box::new(std::io::stdin())),
                None,
            )
            .await;
        }
        Location::Local(p) => p,
        Location::Sandbox { .. } => unreachable!("refused by the caller"),
    };
    let meta = std::fs::metadata(&local).with_context(|| format!("{}", local.display()))?;
    let name = local
        .file_name()
        .and_then(|n| n.to_str())
        .map(str::to_string)
        .with_context(|| format!("{}: no file name to copy under", local.display()))?;
    if meta.is_dir() {
        // Entries under the directory's own name; inside, an existing
        // directory gets it as a child, a new path becomes a copy of it.
        let mut archive = tar::Builder::new(Vec::new());
        archive.follow_symlinks(false);
        archive
            .append_dir_all(&name, &local)
            .with_context(|| format!("read {}", local.display()))?;
        let bytes = archive.into_inner().context("archive")?;
        let script = "if [ -d \"$1\" ]; then cd -- \"$1\" && tar -x -f -; \
                      else mkdir -p -- \"$1\" && cd -- \"$1\" && tar -x --strip-components=1 -f -; fi";
        return run_script(
            client,
            id,
            script,
            &[path],
            Some(Box::new(std::io::Cursor::new(bytes))),
            None,
        )
        .await;
    }
    if !meta.is_file() {
        bail!("{}: not a regular file or directory", local.display());
    }
    let content = std::fs::read(&local).with_context(|| format!("read {}", local.display()))?;
    let mut target = path.to_string();
    if path.ends_with('/') || is_dir(client, id, path).await? {
        target = format!("{}/{name}", path.trim_end_matches('/'));
    }
    let written = client
        .write_file(pb::WriteFileRequest {
            sandbox_id: id.into(),
            path: target.clone(),
            content: content.clone(),
            container: String::new(),
        })
        .await;
    match written {
        Ok(_) => {}
        // Above the one-message limit: streamed, as the client does.
        Err(s) if reason(&s) == "CWSANDBOX_FILE_TOO_LARGE" => {
            let script = "mkdir -p -- \"$(dirname -- \"$1\")\" && cat > \"$1\"";
            run_script(
                client,
                id,
                script,
                &[&target],
                Some(Box::new(std::io::Cursor::new(content))),
                None,
            )
            .await?;
        }
        Err(s) => return Err(remote::status_error(s)),
    }
    let mode = format!("{:o}", meta.permissions().mode() & 0o7777);
    run_script(
        client,
        id,
        "chmod -- \"$1\" \"$2\"",
        &[&mode, &target],
        None,
        None,
    )
    .await
}

async fn download(client: &mut Client, id: &str, path: &str, to: Location) -> Result<()> {
    if to == Location::Stdio {
        let (parent, base) = split_parent(path);
        let mut out = std::io::stdout().lock();
        return run_script(
            client,
            id,
            "tar -c -f - -C \"$1\" -- \"$2\"",
            &[&parent, &base],
            None,
            Some(&mut out),
        )
        .await;
    }
    let Location::Local(local) = to else {
        unreachable!("refused by the caller")
    };
    let read = client
        .read_file(pb::ReadFileRequest {
            sandbox_id: id.into(),
            path: path.into(),
            container: String::new(),
        })
        .await;
    let content = match read {
        Ok(r) => Some(r.into_inner().content),
        Err(s) if reason(&s) == "CWSANDBOX_FILE_IS_DIRECTORY" => {
            return download_dir(client, id, path, &local).await
        }
        // Above the one-message limit: streamed, as the client does.
        Err(s) if reason(&s) == "CWSANDBOX_FILE_TOO_LARGE" => None,
        Err(s) => return Err(remote::status_error(s)).with_context(|| format!("{id}:{path}")),
    };
    let mut target = local.clone();
    if local.is_dir() {
        let name = base_name(path).with_context(|| format!("{path:?}: no file name"))?;
        target.push(name);
    }
    let mode = run_output(client, id, &["stat", "-c", "%a", "--", path]).await?;
    let mode = u32::from_str_radix(mode.trim(), 8)
        .with_context(|| format!("mode of {path}: {:?}", mode.trim()))?;
    let mut file =
        std::fs::File::create(&target).with_context(|| format!("create {}", target.display()))?;
    match content {
        Some(content) => file
            .write_all(&content)
            .with_context(|| format!("write {}", target.display()))?,
        None => {
            let mut out = std::io::BufWriter::new(&mut file);
            run_script(client, id, "cat -- \"$1\"", &[path], None, Some(&mut out)).await?;
            out.flush()
                .with_context(|| format!("write {}", target.display()))?;
        }
    }
    file.set_permissions(std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", target.display()))?;
    Ok(())
}

/// A sandbox's directory into `local`: inside it when it exists, else as
/// `local` itself.
async fn download_dir(client: &mut Client, id: &str, path: &str, local: &Path) -> Result<()> {
    let (parent, base) = split_parent(path);
    let mut archive = Vec::new();
    run_script(
        client,
        id,
        "tar -c -f - -C \"$1\" -- \"$2\"",
        &[&parent, &base],
        None,
        Some(&mut archive),
    )
    .await?;
    // Unpacked beside its destination first (`unpack_in` refuses entries
    // that leave it, symlinks included: the sandbox's tar is hostile), then
    // renamed into place.
    let (staging_parent, target) = if local.is_dir() {
        (local.to_path_buf(), local.join(&base))
    } else {
        let parent = match local.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        (parent, local.to_path_buf())
    };
    if target.exists() {
        bail!("{}: already exists", target.display());
    }
    let staging = staging_parent.join(format!(".sandpit-cp-{}", std::process::id()));
    std::fs::create_dir(&staging).with_context(|| format!("create {}", staging.display()))?;
    let unpacked = unpack(&archive, &staging, &base).and_then(|()| {
        std::fs::rename(staging.join(&base), &target)
            .with_context(|| format!("rename into {}", target.display()))
    });
    let _ = std::fs::remove_dir_all(&staging);
    unpacked
}

/// Unpacks `archive` (entries under `base/`) into `dir`.
fn unpack(archive: &[u8], dir: &Path, base: &str) -> Result<()> {
    let mut entries = tar::Archive::new(std::io::Cursor::new(archive));
    entries.set_preserve_permissions(true);
    for entry in entries.entries().context("read the archive")? {
        let mut entry = entry.context("read the archive")?;
        let name = entry.path().context("entry name")?.into_owned();
        let first = name.components().next();
        if !matches!(first, Some(Component::Normal(c)) if c == base) {
            bail!("archive entry {} is outside the copy", name.display());
        }
        let inside = entry
            .unpack_in(dir)
            .with_context(|| format!("unpack {}", name.display()))?;
        if !inside {
            bail!("archive entry {} is outside the copy", name.display());
        }
    }
    Ok(())
}

async fn is_dir(client: &mut Client, id: &str, path: &str) -> Result<bool> {
    let r = unary(client, id, &["test", "-d", path]).await?;
    Ok(r.exit_code == 0)
}

async fn run_output(client: &mut Client, id: &str, argv: &[&str]) -> Result<String> {
    let r = unary(client, id, argv).await?;
    if r.exit_code != 0 {
        bail!(
            "{}: {}",
            argv.join(" "),
            String::from_utf8_lossy(&r.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&r.stdout).into_owned())
}

async fn unary(client: &mut Client, id: &str, argv: &[&str]) -> Result<pb::ExecResponse> {
    Ok(client
        .exec(pb::ExecRequest {
            sandbox_id: id.into(),
            command: argv.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        })
        .await
        .map_err(remote::status_error)?
        .into_inner())
}

type Input = Box<dyn std::io::Read + Send>;

/// `sh -c SCRIPT sh ARGS...` in the sandbox over StreamExec: `input` to its
/// stdin, its stdout to `output`; fails with its stderr when it fails.
async fn run_script(
    client: &mut Client,
    id: &str,
    script: &str,
    args: &[&str],
    input: Option<Input>,
    mut output: Option<&mut dyn Write>,
) -> Result<()> {
    let command = ["sh", "-c", script, "sh"]
        .iter()
        .chain(args)
        .map(|s| s.to_string())
        .collect();
    let (tx, rx) = mpsc::channel(16);
    let init = pb::ExecStreamInit {
        sandbox_id: id.into(),
        command,
        ..Default::default()
    };
    tx.send(pb::ExecStreamRequest {
        message: Some(In::Init(init)),
    })
    .await
    .ok();
    match input {
        Some(input) => crate::exec::forward_input(input, tx),
        None => {
            tx.send(pb::ExecStreamRequest {
                message: Some(In::Close(pb::ExecStreamClose {})),
            })
            .await
            .ok();
        }
    }
    let mut stream = client
        .stream_exec(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(remote::status_error)?
        .into_inner();
    let mut stderr = Vec::new();
    while let Some(response) = stream.message().await.map_err(remote::status_error)? {
        match response.message {
            Some(Out::Output(o)) if o.stream == PbStream::Stderr as i32 => {
                // Bounded: only a message comes out of it.
                if stderr.len() < 64 << 10 {
                    stderr.extend_from_slice(&o.data);
                }
            }
            Some(Out::Output(o)) => {
                if let Some(out) = output.as_mut() {
                    out.write_all(&o.data).context("write output")?;
                }
            }
            Some(Out::Exit(e)) if e.exit_code == 0 => return Ok(()),
            Some(Out::Exit(e)) => {
                let text = String::from_utf8_lossy(&stderr);
                let text = text.trim();
                if text.is_empty() {
                    bail!("{id}: exited with {} in the sandbox", e.exit_code);
                }
                bail!("{id}: {text}");
            }
            Some(Out::Error(e)) => bail!("exec: {}", e.message),
            Some(Out::Ready(_)) | None => {}
        }
    }
    bail!("the daemon ended the exec without an exit status")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sandbox(id: &str, path: &str) -> Location {
        Location::Sandbox {
            id: id.into(),
            path: path.into(),
        }
    }

    #[test]
    fn locations_parse_like_docker_cp() {
        assert_eq!(
            parse_location("sb:/etc/hosts").unwrap(),
            sandbox("sb", "/etc/hosts")
        );
        assert_eq!(parse_location("sb:tmp/x").unwrap(), sandbox("sb", "/tmp/x"));
        assert_eq!(parse_location("sb:/a:b").unwrap(), sandbox("sb", "/a:b"));
        assert_eq!(parse_location("-").unwrap(), Location::Stdio);
        assert_eq!(
            parse_location("file.txt").unwrap(),
            Location::Local("file.txt".into())
        );
        assert_eq!(
            parse_location("./a:b").unwrap(),
            Location::Local("./a:b".into())
        );
        assert_eq!(
            parse_location("/x/a:b").unwrap(),
            Location::Local("/x/a:b".into())
        );
        for bad in ["", ":/x", "sb:"] {
            assert!(parse_location(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn paths_split_for_tar() {
        assert_eq!(split_parent("/a/b"), ("/a".into(), "b".into()));
        assert_eq!(split_parent("/a/b/"), ("/a".into(), "b".into()));
        assert_eq!(split_parent("/b"), ("/".into(), "b".into()));
        assert_eq!(base_name("/a/b/"), Some("b"));
        assert_eq!(base_name("/"), None);
    }
}
