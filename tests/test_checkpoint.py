"""Checkpoints: round trip, pruning, RNG state, and atomicity when a save dies half-way."""
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from stellar.train import checkpoint as ckpt
from stellar.train.checkpoint import (capture_rng, latest_checkpoint, list_checkpoints, load_state, load_weights,
                                      resolve_checkpoint, restore_rng, save_checkpoint)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 3)
        self.norm = nn.LayerNorm(3)
        self.register_buffer("g", torch.randn(2, 4))


def fresh(seed):
    torch.manual_seed(seed)
    return Net()


def same_weights(m1, m2):
    s1, s2 = m1.state_dict(), m2.state_dict()
    return s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)


def test_round_trip(tmp_path):
    model = fresh(1)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model.a.weight.sum().backward()
    opt.step()
    state = {"optimizer": opt.state_dict(), "rng": capture_rng(), "loader": {"epoch": 2, "batch": 5}}
    path = save_checkpoint(tmp_path, 7, model, state, config={"seed": 3, "train": {"steps": 9}})
    assert path == tmp_path / "checkpoints" / "step_00000007"
    assert sorted(p.name for p in path.iterdir()) == ["config.yaml", "model.safetensors", "state.pt"]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000007"
    assert latest_checkpoint(tmp_path) == path == resolve_checkpoint(tmp_path) == resolve_checkpoint(path)

    other = fresh(2)
    assert not same_weights(model, other)
    load_weights(path, other)
    assert same_weights(model, other)
    loaded = load_state(path)                      # weights_only=True load: plain types and tensors only
    assert loaded["step"] == 7 and loaded["loader"] == {"epoch": 2, "batch": 5}
    opt2 = torch.optim.AdamW(other.parameters(), lr=0.1)
    opt2.load_state_dict(loaded["optimizer"])
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert ckpt.load_config_of(path) == {"seed": 3, "train": {"steps": 9}}


def test_load_weights_names_mismatched_keys(tmp_path):
    save_checkpoint(tmp_path, 1, fresh(0), {})
    with pytest.raises(KeyError, match="missing"):
        load_weights(latest_checkpoint(tmp_path), nn.Sequential(nn.Linear(5, 3)))


def test_keeps_the_newest_two(tmp_path):
    model = fresh(0)
    for step in (10, 20, 30, 40):
        save_checkpoint(tmp_path, step, model, {}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000030", "step_00000040"]
    assert latest_checkpoint(tmp_path).name == "step_00000040"
    with pytest.raises(ValueError, match="keep"):
        save_checkpoint(tmp_path, 50, model, {}, keep=0)


def test_saving_the_same_step_again_replaces_it(tmp_path):
    save_checkpoint(tmp_path, 5, fresh(0), {"tag": "first"})
    save_checkpoint(tmp_path, 5, fresh(1), {"tag": "second"})
    assert load_state(latest_checkpoint(tmp_path))["tag"] == "second"
    loaded = fresh(9)
    load_weights(latest_checkpoint(tmp_path), loaded)
    assert same_weights(loaded, fresh(1))


@pytest.mark.parametrize("where", ["_write_state", "_write_text_atomic", "_write_weights"])
def test_a_crash_while_saving_leaves_the_previous_checkpoint(tmp_path, monkeypatch, where):
    good = fresh(1)
    save_checkpoint(tmp_path, 10, good, {"tag": "good"})

    real = getattr(ckpt, where)

    def dies_midway(*args, **kwargs):
        if where == "_write_weights":         # a half-written weights file, then the crash
            args[1].write_bytes(b"\x00" * 17)
        elif where == "_write_state":         # weights and state written, killed before the rename
            real(*args, **kwargs)
        # _write_text_atomic: the new directory is complete but `latest` is never replaced
        raise RuntimeError("killed while saving")

    monkeypatch.setattr(ckpt, where, dies_midway)
    with pytest.raises(RuntimeError, match="killed"):
        save_checkpoint(tmp_path, 20, fresh(2), {"tag": "new"})
    monkeypatch.undo()

    path = latest_checkpoint(tmp_path)
    assert path.name == "step_00000010"
    assert load_state(path)["tag"] == "good"
    model = fresh(3)
    load_weights(path, model)
    assert same_weights(model, good)

    # The next save works and clears the debris of the dead one.
    save_checkpoint(tmp_path, 30, fresh(4), {"tag": "later"})
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert not any(n.startswith(".tmp-") for n in names)
    assert latest_checkpoint(tmp_path).name == "step_00000030"


def test_latest_falls_back_to_the_newest_complete_directory(tmp_path):
    save_checkpoint(tmp_path, 1, fresh(0), {})
    save_checkpoint(tmp_path, 2, fresh(0), {})
    (tmp_path / "checkpoints" / "latest").unlink()
    assert latest_checkpoint(tmp_path).name == "step_00000002"
    assert latest_checkpoint(tmp_path / "elsewhere") is None
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        resolve_checkpoint(tmp_path / "elsewhere")


def test_rng_state_round_trip(tmp_path):
    model = fresh(0)
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    torch.rand(3), np.random.rand(3), random.random()       # mid-stream, not at a seed
    save_checkpoint(tmp_path, 1, model, {"rng": capture_rng()})
    expected = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)])
    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    restore_rng(load_state(latest_checkpoint(tmp_path))["rng"])
    got = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)])
    assert torch.equal(expected[0], got[0])
    assert np.array_equal(expected[1], got[1])
    assert expected[2] == got[2]


# --------------------------------------------------------------------------- FSDP2 (sharded) checkpoints

@pytest.fixture
def one_rank_group():
    """A gloo process group of one rank in this process (FSDP2 and torch.distributed.checkpoint need one)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def sharded_net(seed):
    from torch.distributed.fsdp import fully_shard

    model = fresh(seed)
    fully_shard(model.a)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model.a(torch.randn(2, 5)).sum().backward()
    opt.step()
    return model, opt


@pytest.mark.parametrize("dies", ["in_dcp_save", "before_the_rename"])
def test_a_crash_while_saving_a_sharded_checkpoint_leaves_the_previous_one(tmp_path, monkeypatch, one_rank_group, dies):
    import torch.distributed.checkpoint as dcp

    good, good_opt = sharded_net(1)
    path = ckpt.save_sharded_checkpoint(tmp_path, 10, good, good_opt, {"tag": "good"}, config={"seed": 1})
    assert ckpt.is_sharded(path) and not (path / "model.safetensors").exists()
    expected = {k: v.full_tensor().clone() for k, v in good.state_dict().items() if hasattr(v, "full_tensor")}

    real_save = dcp.save

    def dcp_dies(state, checkpoint_id):
        Path(checkpoint_id).mkdir(parents=True)
        (Path(checkpoint_id) / "__0_0.distcp").write_bytes(b"\x00" * 9)      # a half-written shard
        raise RuntimeError("killed while saving")

    def finish_dies(*args, **kwargs):
        raise RuntimeError("killed while saving")

    if dies == "in_dcp_save":
        monkeypatch.setattr(dcp, "save", dcp_dies)
    else:                                     # every shard written, killed before the rename
        monkeypatch.setattr(ckpt, "_write_state", finish_dies)
    newer, newer_opt = sharded_net(2)
    with pytest.raises(RuntimeError, match="killed"):
        ckpt.save_sharded_checkpoint(tmp_path, 20, newer, newer_opt, {"tag": "new"})
    monkeypatch.undo()
    assert dcp.save is real_save

    assert latest_checkpoint(tmp_path) == path and [p.name for p in list_checkpoints(tmp_path)] == ["step_00000010"]
    assert load_state(path)["tag"] == "good"
    plain = fresh(3)                         # the shards read whole into a plain module
    load_weights(path, plain)
    for name, value in expected.items():
        assert torch.equal(plain.state_dict()[name], value), name
    ckpt.save_sharded_checkpoint(tmp_path, 30, newer, newer_opt, {"tag": "later"})
    assert not any(p.name.startswith(".tmp-") for p in (tmp_path / "checkpoints").iterdir())
    assert latest_checkpoint(tmp_path).name == "step_00000030"


def test_rank_state_for_more_or_fewer_ranks_and_old_checkpoints():
    two = {"ranks": [{"rng": "r0", "loader": {"batch": 3}}, {"rng": "r1", "loader": {"batch": 3}}]}
    assert ckpt.rank_state(two, 1) == {"rng": "r1", "loader": {"batch": 3}}
    assert ckpt.rank_state(two, 2) is None                                  # a rank the run did not have
    old = {"rng": "r0", "loader": {"batch": 5}, "optimizer": {}}            # rank 0's, at the top level
    assert ckpt.rank_state(old, 0) == {"rng": "r0", "loader": {"batch": 5}}
