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


def one_line_error(result, code: int | None = None) -> str:
    """A CLI run (typer's CliRunner result) failed with a single 'error: ...' line on stderr, no traceback, and exit
    `code` when given; returns that line."""
    assert result.exit_code != 0, result.output
    if code is not None:
        assert result.exit_code == code, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]
