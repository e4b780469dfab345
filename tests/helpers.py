"""Small helpers several test files share."""
import io
import tarfile
from pathlib import Path


def write_raw_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    """A tar file holding exactly these (name, bytes) members, in order: for hand-made (and broken) shards."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
