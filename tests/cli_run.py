"""Runs the `qwenserve` console script's `main` in the test process (shared by the CLI tests)."""
from qwenserve import cli


def run_cli(capsys, *argv):
    """(exit code, stdout, stderr) of `qwenserve ARGV` run in this process."""
    try:
        code = cli.main(list(argv))
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err
