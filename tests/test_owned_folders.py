"""Temporary folders (an ONNX Runtime program's graph and weights, a .moecc file unpacked or staged) live as long as
what reads them: left behind, a test run's compiles filled the disk with tens of GB."""

import copy
import gc
import pickle
import tempfile

import pytest
import torch
from hf_models import make_inputs, make_model

import moecc
from moecc.errors import BackendError
from moecc.files import OwnedFolder


@pytest.fixture
def tmp_root(tmp_path, monkeypatch):
    """mkdtemp's folders go under tmp_path, so a test sees only its own."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def _left(root, prefix):
    gc.collect()
    return sorted(p.name for p in root.iterdir() if p.name.startswith(prefix))


def test_an_owned_folder_goes_with_its_last_holder_and_a_pickled_one_borrows(tmp_root):
    folder = OwnedFolder("moecc_x_")
    (tmp_root / _left(tmp_root, "moecc_x_")[0] / "f").write_text("data")
    holder = {"folder": folder}
    copied = copy.deepcopy(holder)
    assert copied["folder"] is folder  # copies share it
    borrowed = pickle.loads(pickle.dumps(folder))
    assert borrowed.path == folder.path
    del borrowed
    assert _left(tmp_root, "moecc_x_")  # a pickled copy does not remove it
    del folder, holder
    assert _left(tmp_root, "moecc_x_")  # the deep copy still holds it
    del copied
    assert not _left(tmp_root, "moecc_x_")


def test_a_compiled_models_onnx_folder_is_removed_with_its_last_copy(tmp_root):
    model = make_model("mixtral").eval()
    kwargs = make_inputs("mixtral", 2, 8)
    cm = moecc.compile(model, backend="onnxruntime")
    with torch.no_grad():
        want = cm(**kwargs).logits
    assert len(_left(tmp_root, "moecc_onnx_")) == 1
    again = copy.deepcopy(cm)  # reopens its session from the same files
    del cm
    assert len(_left(tmp_root, "moecc_onnx_")) == 1
    with torch.no_grad():
        torch.testing.assert_close(again(**kwargs).logits, want)
    del again
    assert not _left(tmp_root, "moecc_onnx_")


def test_a_lowering_that_fails_leaves_no_folder(tmp_root, monkeypatch):
    from moecc.codegen.onnx import lower

    def fails(*args, **kwargs):
        raise RuntimeError("export broke")

    monkeypatch.setattr(lower, "to_onnx", fails)
    model = make_model("mixtral").eval()
    with pytest.raises(BackendError, match="export broke"), torch.no_grad():
        moecc.compile(model, backend="onnxruntime")(**make_inputs("mixtral", 2, 8))
    assert not _left(tmp_root, "moecc_onnx_")


def test_a_moecc_file_is_staged_and_unpacked_in_folders_that_do_not_stay(tmp_root):
    model = make_model("mixtral").eval()
    kwargs = make_inputs("mixtral", 2, 8)
    path = moecc.export(model, (), tmp_root / "model.moecc", kwargs=kwargs, backend="onnxruntime", verify=False)
    assert path.is_file() and not _left(tmp_root, "moecc_export_")
    loaded = moecc.load(path)
    assert len(_left(tmp_root, "moecc_load_")) == 1
    with torch.no_grad():
        torch.testing.assert_close(loaded(**kwargs).logits, model(**kwargs).logits, atol=1e-5, rtol=1e-4)
    del loaded
    assert not _left(tmp_root, "moecc_load_")
