"""What the workbench relies on in its pinned libraries where they offer no public API or typed error: each test
fails the day a library changes it (then adapt the workbench's call, or its reading of the message)."""

from __future__ import annotations

import inspect
import io
import pickle

import pytest
import torch

from helpers.models.checkpoints import TORCH_READ_ERRORS, state_dict_mismatch, unpickling_reason


class Unlisted:
    """A class that torch's weights_only unpickler does not allow."""


def test_open_clip_picks_a_folders_checkpoint_with_its_private_function(tmp_path):
    # helpers.models.backends.openclip: the file open_clip loads for local-dir:, found before loading to check it
    from open_clip.factory import _find_checkpoint_in_dir

    assert list(inspect.signature(_find_checkpoint_in_dir).parameters) == ["dir_path"]
    assert _find_checkpoint_in_dir(tmp_path) is None
    for name in ("other.pth", "model.safetensors", "open_clip_pytorch_model.bin"):
        (tmp_path / name).write_bytes(b"")
    assert _find_checkpoint_in_dir(tmp_path) == str(tmp_path / "open_clip_pytorch_model.bin")


def test_ipython_shows_given_lines_as_the_error_through_its_private_hook():
    # helpers.infra.errors.install_notebook_handler: a custom handler's return is discarded, _showtraceback shows it
    from ipykernel.zmqshell import ZMQInteractiveShell
    from IPython.core.interactiveshell import InteractiveShell

    for shell in (InteractiveShell, ZMQInteractiveShell):
        assert list(inspect.signature(shell._showtraceback).parameters) == ["self", "etype", "evalue", "stb"]
    assert "_showtraceback" in vars(ZMQInteractiveShell)  # the kernel sends it as the cell's error output
    assert list(inspect.signature(InteractiveShell.set_custom_exc).parameters) == ["self", "exc_tuple", "handler"]


def test_torch_reports_the_cpus_bf16_instructions_by_these_names():
    # helpers.models.device.cpu_computes_bf16_natively
    capabilities = torch.cpu.get_capabilities()
    if capabilities.get("architecture") in ("x86_64", "x86"):
        assert {"avx512_bf16", "amx_tile"} <= set(capabilities)


def test_torch_error_texts_the_checkpoint_messages_read():
    # helpers.models.backends.openclip._loading_problem: torch raises RuntimeError and UnpicklingError, told apart
    # by text
    with pytest.raises(RuntimeError) as mismatch:
        torch.nn.Linear(2, 3).load_state_dict({"weight": torch.zeros(2, 2), "extra": torch.zeros(1)})
    assert str(mismatch.value).startswith("Error(s) in loading state_dict")
    assert state_dict_mismatch(str(mismatch.value)) == (
        "1 missing keys (e.g. bias), 1 unexpected (e.g. extra), 1 of other shapes (e.g. weight [2, 2] in the file, "
        "[3, 2] in the model)")

    buf = io.BytesIO()
    torch.save({"w": torch.zeros(1000)}, buf)
    with pytest.raises(RuntimeError) as truncated:
        torch.load(io.BytesIO(buf.getvalue()[:2000]), weights_only=True)
    assert str(truncated.value).startswith(TORCH_READ_ERRORS)

    buf = io.BytesIO()
    torch.save({"w": Unlisted()}, buf)
    with pytest.raises(pickle.UnpicklingError) as pickled:
        torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    assert "Unsupported global" in str(pickled.value)
    assert unpickling_reason(pickled.value).startswith("Unsupported global: GLOBAL ")


def test_nbformat_is_imported_without_jsonschemas_iri_grammar():
    # helpers.runs.notebooks.import_nbformat: jsonschema leaves the iri format out when rfc3987_syntax cannot be
    # imported; the module is blanked for that import only
    import subprocess
    import sys

    code = ("import sys; from helpers.runs.notebooks import import_nbformat; import_nbformat(); import jsonschema; "
            "print('iri' in jsonschema.FormatChecker.checkers, 'rfc3987_syntax' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
