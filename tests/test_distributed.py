"""Many processes on the CPU (gloo, 2 processes, a tiny model): results independent of the world
size for DDP (across a torchrun --max-restarts restart) and FSDP2, two simulated nodes then one
process, a SIGKILLed rank, a frozen rank, and the run directory's lock. Each launch costs a few
seconds of imports per process, so the tests are few and each checks several things.

This file is also the worker that torchrun starts: ``python tests/test_distributed.py run --out DIR
[--stop-after K] [--crash-once-at K] [key=value ...]`` calls ``pretrain`` with the loader below.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from stellar.train import load_config, pretrain, read_metrics
from stellar.train.checkpoint import is_sharded, latest_checkpoint, list_checkpoints, load_pretrained
from stellar.train.synthetic import SyntheticLoader

HERE = Path(__file__).resolve()
TINY = [
    "model.arch=tiny", "model.img_size=32", "model.patch_size=8", "model.dim=32", "model.depth=1",
    "model.heads=2", "model.num_tokens=4", "model.decoder={dim: 32, depth: 1, heads: 2, mlp_dim: 64}",
    "model.clustering={hidden: 32, bottleneck: 16, prototypes: 32}",
    "data.global_size=32", "data.local_size=16", "data.num_global=2", "data.num_local=2", "data.num_workers=0",
    "train.lr=1e-3", "train.device=cpu", "train.warmup=0.25", "train.steps=4", "train.checkpoint_every=1",
    "train.keep_checkpoints=4", "train.dist_timeout_s=60", "log.progress=false", "log.tensorboard=false",
]
GLOBAL_BATCH = 4


class GlobalBatchLoader(SyntheticLoader):
    """Rank r of W reads rows [r*b, (r+1)*b) of each global batch of W*b samples, each global batch
    (its images and the patches its masked views keep) a pure function of (seed, its number), so
    W processes with batch b see the same global batches as one process with W*b; ``state_dict``
    counts global batches (stellar.train.synthetic). ``STELLAR_TEST_STALL=rank:batch`` makes that
    rank stall before that global batch (a rank to be killed while the others wait for it).
    """

    def __init__(self, cfg, rank, world_size):
        super().__init__(cfg, rank, world_size)
        stall = os.environ.get("STELLAR_TEST_STALL")
        self.stall = tuple(int(v) for v in stall.split(":")) if stall else None

    def global_batch(self, k):
        if self.stall == (self.rank, k):
            time.sleep(120)
        return super().global_batch(k)


def config(*overrides):
    return load_config(None, [*TINY, *overrides])


def losses(run_dir):
    return [{k: v for k, v in row.items() if k != "img_per_s"} for row in read_metrics(Path(run_dir) / "metrics.csv")]


def assert_same_losses(got, want, rtol=2e-5, atol=1e-6):
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for g, w in zip(got, want):
        for key in w:
            assert g[key] == pytest.approx(w[key], rel=rtol, abs=atol), (g["step"], key, g[key], w[key])


def assert_same_weights(checkpoint_a, checkpoint_b, rtol=1e-3, prefix=""):
    """The two runs moved the weights the same way: |w_a - w_b| <= rtol |w_b - w_0| over all weights
    (those whose names start with ``prefix``).

    Not element by element: AdamW's first steps are about lr * sign(gradient), so a parameter
    whose gradient is a near-cancelling sum can move by +-lr in one run and -+lr in the other
    from float32 rounding alone; those few elements weigh little in the norm.
    """
    from stellar.model import build_model
    from stellar.train.checkpoint import load_config_of
    from stellar.train.trainer import seed_everything

    (model_a, cfg, _), (model_b, _, _) = load_pretrained(checkpoint_a), load_pretrained(checkpoint_b)
    seed_everything(int(cfg["seed"]))                     # the initial weights, as pretrain builds them
    initial = build_model(load_config_of(checkpoint_a)["model"]).state_dict()
    a, b = model_a.state_dict(), model_b.state_dict()
    assert a.keys() == b.keys() == initial.keys()
    keys = [k for k in a if k.startswith(prefix)]
    assert keys, prefix
    diff = torch.cat([(a[k].float() - b[k].float()).flatten() for k in keys]).norm().item()
    moved = torch.cat([(b[k].float() - initial[k].float()).flatten() for k in keys]).norm().item()
    assert moved > 0 and diff <= rtol * moved, (diff, moved)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra):
    out = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT", "TORCHELASTIC_RUN_ID")}
    out.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **{k: str(v) for k, v in extra.items()})
    return out


def torchrun(*args, timeout=120, **extra_env):
    """``python -m torch.distributed.run ARGS`` (torchrun from the venv); returns the CompletedProcess."""
    cmd = [sys.executable, "-m", "torch.distributed.run", *args]
    proc = subprocess.run(cmd, env=env(**extra_env), capture_output=True, text=True, timeout=timeout)
    return proc


def worker_args(out, *overrides, stop_after=None, resume=False, crash_once_at=None):
    args = [str(HERE), "run", "--out", str(out)]
    args += ["--stop-after", str(stop_after)] if stop_after else []
    args += ["--crash-once-at", str(crash_once_at)] if crash_once_at else []
    args += ["--resume"] if resume else []
    return [*args, *overrides]


def ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, the whole global batch, 4 steps, a checkpoint after each."""
    out = tmp_path_factory.mktemp("reference") / "run"
    pretrain(config(f"train.batch_size={GLOBAL_BATCH}"), out, loader_fn=GlobalBatchLoader)
    return out


def reference_checkpoint(reference, step):
    return reference / "checkpoints" / f"step_{step:08d}"


# --------------------------------------------------------------------------- world-size equivalence

def test_ddp_two_processes_match_one_process_across_a_torchrun_restart(tmp_path, reference):
    """2 processes x 2 images == 1 x 4 for 4 steps. On the way rank 1 crashes in step 3 (first
    attempt only) and torchrun --max-restarts 1 restarts both, which resume from step 2 by
    themselves (and take over the lock the killed rank 0 left)."""
    out = tmp_path / "ddp"
    proc = ok(torchrun("--nproc-per-node", "2", "--max-restarts", "1",
                       *worker_args(out, f"train.batch_size={GLOBAL_BATCH // 2}", crash_once_at=3)))
    assert "crashing on purpose" in proc.stdout + proc.stderr               # the first attempt did crash
    assert_same_losses(losses(out), losses(reference))                      # steps 1..4, once each
    assert_same_weights(latest_checkpoint(out), reference_checkpoint(reference, 4))
    state = torch.load(latest_checkpoint(out) / "state.pt", weights_only=True)
    assert state["world_size"] == 2 and state["global_batch"] == GLOBAL_BATCH and state["parallel"] == "ddp"
    assert [r["loader"] for r in state["ranks"]] == [{"epoch": 1, "batch": 1}] * 2       # each rank's own
    assert not torch.equal(state["ranks"][0]["rng"]["torch"], state["ranks"][1]["rng"]["torch"])
    assert not (out / ".lock").exists()


def test_fsdp_two_processes_match_one_process_and_resume_on_one(tmp_path, reference):
    out = tmp_path / "fsdp"
    ok(torchrun("--nproc-per-node", "2", *worker_args(out, f"train.batch_size={GLOBAL_BATCH // 2}",
                                                     "train.parallel=fsdp", stop_after=3)))
    assert_same_losses(losses(out), losses(reference)[:3])
    step3 = latest_checkpoint(out)
    assert step3.name == "step_00000003" and is_sharded(step3) and not (step3 / "model.safetensors").exists()
    assert len(list((step3 / "sharded").glob("*.distcp"))) == 2                  # one shard file per rank
    assert_same_weights(step3, reference_checkpoint(reference, 3))               # load_pretrained gathers shards

    # Saved on 2 processes, resumed on 1 (no process group: the shards are read whole).
    with pytest.warns(RuntimeWarning, match="the same images"):
        pretrain(config(f"train.batch_size={GLOBAL_BATCH}", "train.parallel=fsdp"), out, resume=True,
                 loader_fn=GlobalBatchLoader)
    assert_same_losses(losses(out), losses(reference))
    assert_same_weights(latest_checkpoint(out), reference_checkpoint(reference, 4))


def test_fsdp_shards_the_ema_teacher_and_matches_one_process(tmp_path):
    """FSDP2 with the EMA teacher (sharded like the student, averaged after each optimizer step):
    2 processes x 2 images == 1 x 4, the teacher's weights included."""
    ema = ["model.ema={enabled: true, momentum: 0.5}", "train.steps=2"]
    one = tmp_path / "one"
    pretrain(config(f"train.batch_size={GLOBAL_BATCH}", *ema), one, loader_fn=GlobalBatchLoader)
    out = tmp_path / "fsdp"
    ok(torchrun("--nproc-per-node", "2", *worker_args(out, f"train.batch_size={GLOBAL_BATCH // 2}",
                                                     "train.parallel=fsdp", *ema)))
    assert is_sharded(latest_checkpoint(out))
    assert_same_losses(losses(out), losses(one))
    assert_same_weights(latest_checkpoint(out), latest_checkpoint(one))
    assert_same_weights(latest_checkpoint(out), latest_checkpoint(one), prefix="teacher.")


# --------------------------------------------------------------------------- two machines

def test_two_nodes_through_the_cli_then_resume_on_one_process(tmp_path):
    """Two torchrun launchers (--nnodes 2, c10d rendezvous on 127.0.0.1), `-m stellar pretrain`."""
    from stellar import cli
    from stellar.data.shapes import ensure_shapes_dataset

    root = ensure_shapes_dataset(tmp_path / "shapes", n_train=16, n_val=4, size=40)
    out = tmp_path / "run"
    port = free_port()
    overrides = [*TINY, f"data.root={root}", "data.backend=reference", "train.batch_size=2",
                 "train.checkpoint_every=2", "train.warmup=0.0", "train.min_lr=1e-3"]   # lr constant: 2+1 steps == 3
    launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
              "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "two-nodes",
              "-m", "stellar", "pretrain", "--config", "tiny", "--out", str(out), *overrides, "train.steps=2"]
    nodes = [subprocess.Popen(launch, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [node.communicate(timeout=120) for node in nodes]
    for node, (stdout, stderr) in zip(nodes, outputs):
        assert node.returncode == 0, stdout[-2000:] + stderr[-4000:]
    assert sum("done: 2 steps" in stdout for stdout, _ in outputs) == 1       # rank 0 reports
    assert [r["step"] for r in read_metrics(out / "metrics.csv")] == [1, 2]    # one writer
    state = torch.load(latest_checkpoint(out) / "state.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["ranks"]) == 2

    # ... resumed by one process with the same global batch (4): the run one process makes alone,
    # through the real loader (its global sample order and per-sample draws, kept patches included).
    with pytest.warns(RuntimeWarning, match="written by 2 processes"):
        assert cli.main(["pretrain", "--resume", str(out), "train.steps=3", "train.batch_size=4"]) == 0
    state = torch.load(latest_checkpoint(out) / "state.pt", weights_only=True)
    assert state["step"] == 3 and state["world_size"] == 1 and state["global_batch"] == 4
    alone = tmp_path / "alone"
    assert cli.main(["pretrain", "--config", "tiny", "--out", str(alone), *overrides, "train.batch_size=4",
                     "train.steps=3"]) == 0
    assert_same_losses(losses(out), losses(alone))
    assert_same_weights(latest_checkpoint(out), latest_checkpoint(alone))


# --------------------------------------------------------------------------- failures

def test_a_killed_rank_stops_the_other_and_the_run_resumes(tmp_path, reference):
    """Two processes started by hand (no torchrun agent to clean up): rank 1 is SIGKILLed while
    rank 0 waits for it in a collective; rank 0 exits non-zero naming rank 1. Meanwhile a second
    run on the same --out is refused by the lock, naming rank 0's pid and host."""
    from stellar.train.lock import RunLockedError

    out = tmp_path / "run"
    port = free_port()
    procs = []
    for rank in range(2):
        e = env(RANK=rank, LOCAL_RANK=rank, WORLD_SIZE=2, LOCAL_WORLD_SIZE=2, MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port, STELLAR_TEST_STALL="1:2")
        procs.append(subprocess.Popen([sys.executable, *worker_args(out, f"train.batch_size={GLOBAL_BATCH // 2}")],
                                      env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        deadline = time.monotonic() + 120
        while not (out / "metrics.csv").is_file() or len(read_metrics(out / "metrics.csv")) < 2:
            assert time.monotonic() < deadline and procs[0].poll() is None, procs[0].communicate()
            time.sleep(0.1)
        with pytest.raises(RunLockedError, match=f"pid {procs[0].pid} on host {socket.gethostname()}"):
            pretrain(config(f"train.batch_size={GLOBAL_BATCH}"), out, loader_fn=GlobalBatchLoader)
        os.kill(procs[1].pid, signal.SIGKILL)                # stalled before global batch 2 (step 3)
        _, stderr = procs[0].communicate(timeout=60)         # well within train.dist_timeout_s + the diagnosis
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert procs[0].returncode not in (0, None)
    assert "RankLostError" in stderr and "lost rank 1 (pid" in stderr and "--resume" in stderr, stderr[-3000:]
    assert latest_checkpoint(out).name == "step_00000002"

    # --resume continues as the uninterrupted run did (here on one process, same global batch).
    with pytest.warns(RuntimeWarning, match="the same images"):
        pretrain(config(f"train.batch_size={GLOBAL_BATCH}"), out, resume=True, loader_fn=GlobalBatchLoader)
    assert_same_losses(losses(out), losses(reference))
    assert_same_weights(latest_checkpoint(out), reference_checkpoint(reference, 4))


def test_a_frozen_rank_is_named_by_the_heartbeat(tmp_path):
    """A rank that stops (SIGSTOP: alive, silent) leaves rank 0 waiting in a collective, as NCCL
    would for a dead peer; rank 0's heartbeat watcher names it after half of dist_timeout_s."""
    out = tmp_path / "run"
    port = free_port()
    procs = [subprocess.Popen([sys.executable, *worker_args(out, f"train.batch_size={GLOBAL_BATCH // 2}",
                                                            "train.dist_timeout_s=6")],
                              env=env(RANK=rank, LOCAL_RANK=rank, WORLD_SIZE=2, LOCAL_WORLD_SIZE=2,
                                      MASTER_ADDR="127.0.0.1", MASTER_PORT=port, STELLAR_TEST_STALL="1:1"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in range(2)]
    try:
        deadline = time.monotonic() + 120
        while not (out / "metrics.csv").is_file() or not read_metrics(out / "metrics.csv"):
            assert time.monotonic() < deadline and procs[0].poll() is None, procs[0].communicate()
            time.sleep(0.1)
        os.kill(procs[1].pid, signal.SIGSTOP)              # stalled before global batch 1 (step 2)
        _, stderr = procs[0].communicate(timeout=60)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert procs[0].returncode == 1
    assert "lost rank 1 (pid" in stderr and "no heartbeat" in stderr, stderr[-3000:]


# --------------------------------------------------------------------------- the lock

def test_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path):
    from stellar.train.lock import RunLock, RunLockedError

    run = tmp_path / "run"
    run.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / ".lock").write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname()}))
        with pytest.raises(RunLockedError, match=f"pid {sleeper.pid} on host {socket.gethostname()}"):
            RunLock(run).acquire()
    finally:
        sleeper.kill()
        sleeper.wait()
    with pytest.warns(RuntimeWarning, match=f"stale lock of pid {sleeper.pid}"):      # now dead: taken over
        lock = RunLock(run).acquire()
    assert json.loads((run / ".lock").read_text())["pid"] == os.getpid()
    with pytest.raises(RunLockedError):
        RunLock(run).acquire()                      # held by this process now
    lock.release()
    assert not (run / ".lock").exists()

    (run / ".lock").write_text(json.dumps({"pid": 1, "host": "elsewhere.example"}))
    with pytest.raises(RunLockedError, match="elsewhere.example.*delete"):
        RunLock(run).acquire()                      # another host: cannot tell, so refused


def test_a_lock_of_an_earlier_torchrun_attempt_is_taken_over(tmp_path, monkeypatch):
    from stellar.train.lock import RunLock, RunLockedError

    (tmp_path / ".lock").write_text(json.dumps({"pid": 1, "host": "elsewhere.example", "run_id": "job7",
                                                "restart": 0}))
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job7")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    with pytest.raises(RunLockedError):
        RunLock(tmp_path).acquire()                 # the same attempt: a live run
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    with pytest.warns(RuntimeWarning, match="stale"):
        RunLock(tmp_path).acquire().release()


@pytest.mark.parametrize("bad", ["train.parallel=zero3", "train.dist_timeout_s=0", "train.dist_timeout_s=soon"])
def test_bad_distributed_settings_are_named(tmp_path, bad):
    from stellar.train import ConfigError

    with pytest.raises(ConfigError, match=bad.split("=")[0]):
        pretrain(config(bad), tmp_path / "run", loader_fn=GlobalBatchLoader)


# --------------------------------------------------------------------------- the worker

def _crash_once_at(step):
    """A model_fn whose model ends the process in the forward of ``step`` on rank 1, first attempt only."""
    from stellar.model import build_model

    def model_fn(model_cfg):
        model = build_model(dict(model_cfg))
        forward, calls = model.forward, [0]

        def crashing(batch):
            calls[0] += 1
            first_attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) == 0
            if calls[0] == step and first_attempt and os.environ.get("RANK") == "1":
                print(f"rank 1: crashing on purpose in step {step}", flush=True)
                os._exit(17)
            return forward(batch)

        model.forward = crashing
        return model

    return model_fn


def _worker(argv):
    import argparse

    from stellar.train.trainer import default_model_fn

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--stop-after", type=int, default=None)
    parser.add_argument("--crash-once-at", type=int, default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    model_fn = _crash_once_at(args.crash_once_at) if args.crash_once_at else default_model_fn
    cfg = None if args.resume else config(*args.overrides)
    pretrain(cfg, args.out, resume=args.resume, stop_after=args.stop_after, loader_fn=GlobalBatchLoader,
             model_fn=model_fn)


if __name__ == "__main__" and sys.argv[1:2] == ["run"]:
    _worker(sys.argv[2:])
