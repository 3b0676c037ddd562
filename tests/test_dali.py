"""The dali backend's decode step (CPU pipeline here): bytes in, RGB out without a copy, the
executor mode and device passed explicitly, failed batches recovered, import failures reported."""
import builtins

import numpy as np
import pytest
import torch
from test_backends import make_realish_folder

from stellar import _ext
from stellar.data import dali, decode

pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed (pip install 'stellar[dali]')")

from stellar.data.loader import DaliLoader, build_loader  # noqa: E402

SMALL = dict(batch_size=3, num_workers=0, device="cpu", seed=5, global_size=16, local_size=8, num_global=2,
             num_local=2, patch_size=4, drop_last=False)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("dali")
    good, bad = make_realish_folder(root)
    return root, good, bad


def test_pipeline_decodes_bytes_to_rgb_without_a_copy(folder):
    _, good, _ = folder
    files = [p for p in good if p.endswith((".jpg", ".png")) and "gray16" not in p and "cmyk" not in p]
    pipe = dali.build_decoder(batch_size=len(files), num_threads=1)
    assert pipe.exec_dynamic and pipe.device_id is None and pipe.prefetch_queue_depth == 1
    encoded = [np.frombuffer(decode.read_bytes(p), np.uint8) for p in files]
    images, outputs = dali.decode_batch(pipe, encoded)
    assert len(images) == len(files)
    for path, img, i in zip(files, images, range(len(files))):
        assert img.dtype == torch.uint8 and img.dim() == 3 and img.shape[2] == 3
        assert img.data_ptr() == outputs[i].data_ptr()  # the torch tensor aliases DALI's buffer
        # as stored (orientation is the loader's step): the reference before its orientation
        ref = decode.decode_file(path)
        upright = decode.apply_orientation(img, decode.read_orientation(decode.read_bytes(path)), layout="HWC")
        assert torch.equal(upright.permute(2, 0, 1), ref), path
    images, _ = dali.decode_batch(pipe, encoded[:2])  # a smaller batch through the same pipeline
    assert len(images) == 2


def test_a_failed_batch_is_decoded_by_the_reference_and_the_pipeline_rebuilt(folder, monkeypatch):
    """DALI refusing a whole batch (as it does for one bad file) loses no sample: its files come
    from the reference decode, the batch is the reference's, the next batch uses a new pipeline."""
    if not _ext.is_available():
        pytest.skip("stellar._C is not built")
    root, _, _ = folder
    ref = list(build_loader(root, backend="reference", **SMALL))
    real = dali.decode_batch
    calls = {"n": 0}

    def fail_second(pipe, encoded, stream=None):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("Critical error in pipeline: nvImageCodec failure: '#1'")
        return real(pipe, encoded, stream)

    monkeypatch.setattr(dali, "decode_batch", fail_second)
    loader = build_loader(root, backend="dali", **SMALL)
    got = list(loader)
    assert loader.rebuilds == 1 and calls["n"] == len(got)
    for a, b in zip(ref, got):
        for key in ("index", "crops", "keep"):
            assert torch.equal(a[key], b[key]), key
    # the failed batch came from the reference decode: its views equal the reference's (op vs twin)
    torch.testing.assert_close(got[1]["global_views"], ref[1]["global_views"], atol=1e-5, rtol=0)


def test_dali_that_does_not_import_says_why(monkeypatch, folder):
    root, _, _ = folder
    real_import = builtins.__import__

    def broken(name, *args, **kwargs):
        if name.startswith("nvidia.dali") or name == "nvidia":
            raise OSError("libnvimgcodec.so.0: cannot open shared object file")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", broken)
    assert dali.dali_status() == (False, "OSError: libnvimgcodec.so.0: cannot open shared object file")
    with pytest.raises(ImportError, match="libnvimgcodec.*pip install 'stellar\\[dali\\]'"):
        DaliLoader(root, **{k: v for k, v in SMALL.items() if k not in ("global_size", "local_size", "num_global",
                                                                          "num_local", "patch_size")})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: the mixed decoder on the loader's device")
def test_gpu_pipeline_decodes_on_the_loaders_own_device(folder):
    root, _, _ = folder
    device = torch.device("cuda", torch.cuda.device_count() - 1)  # not device 0 where there are several
    loader = build_loader(root, backend="dali", **{**SMALL, "device": device})
    batch = next(iter(loader))
    assert loader._pipe.device_id == device.index and loader._pipe.exec_dynamic
    assert batch["global_views"].device == device and batch["keep"].device.type == "cpu"
