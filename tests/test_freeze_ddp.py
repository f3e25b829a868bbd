"`FreezeBN` under real two-process DistributedDataParallel on CPU (gloo), through fastai's `learn.distrib_ctx()`, fused and not."
import os, subprocess, sys
from pathlib import Path
import pytest, torch

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent/'ddp_freeze_worker.py'
pytestmark = pytest.mark.slow   # starts two processes (about 30 s)

@pytest.fixture(scope='module')
def ranks(tmp_path_factory):
    "Run the worker on two ranks with torchrun and load what each rank saved"
    try: import accelerate
    except ImportError: pytest.fail("fastai's `distrib_ctx` needs `accelerate`: it must be in fastfold's dev dependencies")
    out = tmp_path_factory.mktemp('ddp')
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')])}
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', str(WORKER), str(out)]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f'torchrun failed:\n{res.stdout[-4000:]}\n{res.stderr[-8000:]}'
    return [torch.load(out/f'rank{r}.pt') for r in (0, 1)]

def test_really_distributed(ranks):
    "Two gloo ranks, the model wrapped in DDP during training, each rank fed its own half of the data"
    for r in ranks:
        assert (r['world_size'], r['backend'], r['wrappers']) == (2, 'gloo', ['DistributedDataParallel'])
        assert r['unwrapped'], 'after the fit `learn.model` is the plain model again'
    assert len(ranks[0]['inputs']) == len(ranks[1]['inputs']) == 8
    assert ranks[0]['inputs'] != ranks[1]['inputs']

def test_bn_frozen_on_both_ranks(ranks):
    "BN in eval mode at every training batch, parameters and running statistics bit-identical, DDP never saw them"
    for r in ranks:
        assert r['modes'] and not any(r['modes'])
        assert len(r['bn_keys']) == 15   # 3 BN layers x (weight, bias, running_mean, running_var, num_batches_tracked)
        for k in r['bn_keys']: assert torch.equal(r['before'][k], r['after'][k]), k
        assert not r['ddp_has_bn_params'] and r['n_ddp_params'] == r['n_params'] - 6
        assert r['flags_restored']

def test_other_weights_trained_in_sync(ranks):
    "Every other weight changed, and identically on both ranks (DDP averaged their gradients)"
    r0,r1 = ranks
    others = [k for k in r0['before'] if k not in r0['bn_keys']]
    assert len(others) == 6
    for k in others:
        assert not torch.equal(r0['before'][k], r0['after'][k]), k
        assert torch.equal(r0['after'][k], r1['after'][k]), k

def rel(a, b): return ((a.double()-b.double()).norm()/b.double().norm().clamp_min(1e-30)).item()

def test_fused_fit_equals_unfused_under_ddp(ranks):
    "Fused (the default) and `fuse=False` from the same weights and data: the same weights to float32 rounding, nothing left on the model"
    for r in ranks:
        assert r['fused'] == ['1', '4'] and r['unfused']['fused'] == []   # the BatchNorm1d follows a Flatten: not fused
        assert not (r['forward_left'] or r['unfused']['forward_left'])
        for k,v in r['after'].items():
            if v.is_floating_point(): assert rel(v, r['unfused']['after'][k]) < 1e-5, k
    assert any(not torch.equal(ranks[0]['before'][k], v) for k,v in ranks[0]['unfused']['after'].items()), 'the unfused fit trained'
