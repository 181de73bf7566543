"""import_callable: a user's module:function spec comes back as a function or as one error line."""
import pytest

from onnxprune.core.errors import OnnxPruneError
from onnxprune.core.user_code import import_callable


def test_imports_from_file_and_from_module_name(tmp_path, monkeypatch):
    (tmp_path / "usermod_abc.py").write_text("def make():\n    return 42\nVALUE = 1\n")
    fn = import_callable(str(tmp_path / "usermod_abc.py"), "make", "--torch 'x'", namespace="t")
    assert fn() == 42
    monkeypatch.syspath_prepend(str(tmp_path))
    assert import_callable("usermod_abc", "make", "--torch 'x'", namespace="t")() == 42


@pytest.mark.parametrize("modname, fname, message", [
    ("{tmp}/missing.py", "f", "LABEL: no such file"),
    ("no_such_module_xyz_987", "f", "LABEL: cannot import 'no_such_module_xyz_987' (ModuleNotFoundError: "),
    ("{tmp}/broken.py", "f", "LABEL: cannot import '{tmp}/broken.py' (ZeroDivisionError: division by zero)"),
    ("{tmp}/ok.py", "missing", "LABEL: '{tmp}/ok.py' has no callable 'missing'"),
    ("{tmp}/ok.py", "VALUE", "LABEL: '{tmp}/ok.py' has no callable 'VALUE'"),
])
def test_errors_are_one_line_naming_the_spec(tmp_path, modname, fname, message):
    (tmp_path / "broken.py").write_text("x = 1 / 0\n")
    (tmp_path / "ok.py").write_text("VALUE = 1\n")
    with pytest.raises(OnnxPruneError) as exc:
        import_callable(modname.format(tmp=tmp_path), fname, "LABEL", namespace="t")
    text = str(exc.value)
    assert "\n" not in text and text.startswith(message.format(tmp=tmp_path))
