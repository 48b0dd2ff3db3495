"""The session daemon's secret stores (used by test_secrets.py and any docs snippet).

- `wandb`: a managed store (encrypted files), the store the client's and the docs'
  examples name (`Secret(store="wandb", name="HF_TOKEN")`, and `db-credentials` with
  `field="password"`). Its files live in the data dir, so the leak check reads them;
  its key beside the data dir. Filled through the real CLI (`sandpit secret set`, value
  on stdin).
- `files`: a directory store the operator fills by hand (plain files, one JSON).

Every value is random per session.
"""

from __future__ import annotations

import json
import secrets
import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Stores:
    sandpit: Path
    config: Path
    managed_dir: Path
    key_file: Path
    files_dir: Path
    hf_token: str
    db_password: str
    file_token: str
    file_api_key: str

    def cli(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
        """`sandpit secret --config CONFIG ARGS...`, the value (if any) on stdin."""
        return subprocess.run(
            [str(self.sandpit), "secret", "--config", str(self.config), *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def set(self, name: str, value: str, store: str = "wandb") -> None:
        proc = self.cli("set", store, name, stdin=value + "\n")
        assert proc.returncode == 0, f"sandpit secret set {store} {name}: {proc.stderr}"


def config_toml(root: Path, data_dir: Path) -> str:
    """The `[secret_stores]` tables of the session's sandpitd.toml."""
    return (
        "[secret_stores.wandb]\n"
        'kind = "managed"\n'
        f'dir = "{data_dir / "secrets" / "wandb"}"\n'
        f'key_file = "{root / "keys" / "wandb.key"}"\n'
        "[secret_stores.files]\n"
        f'dir = "{root / "secret-files"}"\n'
    )


def fill(sandpit: Path, config: Path, root: Path, data_dir: Path) -> Stores:
    files_dir = root / "secret-files"
    files_dir.mkdir(mode=0o700)
    (files_dir / "team").mkdir(mode=0o700)
    stores = Stores(
        sandpit=sandpit,
        config=config,
        managed_dir=data_dir / "secrets" / "wandb",
        key_file=root / "keys" / "wandb.key",
        files_dir=files_dir,
        hf_token=f"hf_{secrets.token_hex(16)}",
        db_password=f"pw-{secrets.token_hex(12)}",
        file_token=f"ft-{secrets.token_hex(12)}",
        file_api_key=f"ak-{secrets.token_hex(12)}",
    )
    (files_dir / "team" / "token").write_text(stores.file_token + "\n")
    (files_dir / "service.json").write_text(
        json.dumps({"api_key": stores.file_api_key, "region": "local"})
    )
    stores.set("HF_TOKEN", stores.hf_token)
    stores.set(
        "db-credentials", json.dumps({"username": "app", "password": stores.db_password})
    )
    return stores
