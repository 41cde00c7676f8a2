"""The public API stays what the README promises, whatever submodules were imported first."""
import importlib
import pkgutil

import devit_ext


def test_public_names_are_the_api_objects_after_importing_every_submodule():
    # A submodule named like a public function would shadow it once imported
    # (Python binds the submodule on the package); import them all, then check.
    for info in pkgutil.walk_packages(devit_ext.__path__, "devit_ext."):
        if info.name.endswith(("__main__", ".cli")):
            continue
        importlib.import_module(info.name)
    for name in ("decompose", "train_dekd", "train_teacher", "collaborate", "load", "build_info"):
        assert callable(getattr(devit_ext, name)), name
    assert isinstance(devit_ext.DeViT, type)
    assert devit_ext.ops.quantize_int8 is not None
    assert isinstance(devit_ext.__version__, str)


def test_cli_parser_builds_with_every_subcommand():
    from devit_ext.cli import COMMANDS, build_parser

    parser = build_parser()  # imports every subcommand's module
    assert set(COMMANDS) == {"demo", "bench", "worker", "decompose", "train", "evaluate", "export"}
    args = parser.parse_args(["bench", "kernels", "--device", "cpu"])
    assert (args.command, args.suite, args.device) == ("bench", "kernels", "cpu")
