"""Where this repository's DVC objects are: the default remote's URL, the local caches."""
from __future__ import annotations

from pathlib import Path


def dvc_remote_url(root: Path) -> str | None:
    """URL of the repository's default DVC remote, read with DVC's own config loader."""
    try:
        from dvc.config import Config

        conf = Config(dvc_dir=str(root / ".dvc"))
        name = conf["core"].get("remote")
        return conf["remote"][name]["url"] if name else None
    except Exception:  # noqa: BLE001 - no DVC, no repo, or no remote
        return None


def dvc_caches(root: Path) -> list[Path]:
    """Local places holding DVC objects: the cache and every remote that is a local path."""
    places: list[Path] = []
    try:
        from dvc.config import Config

        conf = Config(dvc_dir=str(root / ".dvc"))
        cache_dir = conf["cache"].get("dir")
        places.append(Path(cache_dir) if cache_dir else root / ".dvc" / "cache")
        for remote in (conf.get("remote") or {}).values():
            url = str(remote.get("url", ""))
            if url and ("://" not in url or url.startswith("file://")):
                path = Path(url.removeprefix("file://"))
                places.append(path if path.is_absolute() else root / ".dvc" / path)
    except Exception:  # noqa: BLE001 - DVC absent or no repository: the default cache only
        places.append(root / ".dvc" / "cache")
    return [p for p in places if p.exists()]
