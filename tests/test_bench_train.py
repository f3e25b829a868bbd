"Tests of `fastfold.bench_train` and `fastfold-bench --train`: short runs (tiny images, two repetitions), nothing timed"
import math, subprocess, sys
from pathlib import Path
import pandas as pd, pytest, torch
from torch import nn
from fastfold.bench_models import BenchError
from fastfold.bench_train import (TRAIN_ARMS, TRAIN_CSV_COLUMNS, UNFUSED, FUSED, bench_train, batch_dls, train_batch,
                                  train_learner, training_steps, saved_bytes, train_targets, train_report,
                                  write_train_csv, plot_train)
from fastfold.freeze import FreezeBN

BENCH = Path(sys.executable).parent/'fastfold-bench'
FAST = dict(reps=2, warmup=1, min_time=0, progress=False)
PNG = b'\x89PNG\r\n\x1a\n'

@pytest.fixture(scope='module')
def df(): return bench_train(['resnet18'], bs=[2], sizes=[32], **FAST)

def test_rows(df):
    assert list(df.arm) == list(TRAIN_ARMS) and set(df.model) == {'resnet18'}
    assert set(TRAIN_CSV_COLUMNS) <= set(df.columns)
    assert (df.ms_median > 0).all() and all(len(t) == 2 for t in df.ms_reps)
    assert (df.saved_bytes > 0).all() and (df.saved_storages > 0).all() and df.first_loss.map(math.isfinite).all()
    r = df.set_index('arm')
    assert r.loc['fastai'].bn_frozen == 0 and r.loc[UNFUSED].bn_frozen == 20      # resnet18's body; the head's BN learn
    assert r.loc['fastai'].step_vs_fastai == 1 and r.loc['fastai'].saved_vs_fastai == 1

def test_same_model_every_arm():
    dls = batch_dls(train_batch(2, 32))
    sds = [train_learner('resnet18', dls, arm).model.state_dict() for arm in TRAIN_ARMS.values()]
    for sd in sds[1:]:
        assert list(sd) == list(sds[0]) and all(torch.equal(a, b) for a,b in zip(sd.values(), sds[0].values()))

def test_training_steps_are_fastai_steps():
    "Each step is fastai's `one_batch` inside a fit: callbacks see every event; an error ends it as it ends `fit`"
    b = train_batch(2, 32)
    learn = train_learner('resnet18', batch_dls(b), TRAIN_ARMS[UNFUSED])
    bn = learn.model[0][1]
    with training_steps(learn) as step:
        assert not bn.training and not bn.weight.requires_grad
        step(b); step(b)
        assert learn.train_iter == 2 and len(learn.recorder.losses) == 2
    assert bn.weight.requires_grad                                   # after_fit ran: FreezeBN gave its flags back
    with pytest.raises(RuntimeError, match='boom'):
        with training_steps(learn) as step:
            step(b); raise RuntimeError('boom')
    assert not bn.weight.requires_grad                               # no after_fit after an error, as in `fit`
    learn.freeze_bn.restore()

def test_saved_bytes():
    w = torch.randn(1000, requires_grad=True)
    assert saved_bytes(lambda: (w*w).sum()) == (4000, 1)           # saved twice, one storage
    assert saved_bytes(lambda: (w[:500]*w[500:]).sum()) == (4000, 1) # two views of one storage
    assert saved_bytes(lambda: (w*w.exp()).sum()) == (8000, 2)      # w, and exp's result (saved by exp and by mul)
    with torch.no_grad(): assert saved_bytes(lambda: (w*w).sum()) == (0, 0)

def group(**arms):
    "Rows of one model, batch size and size: `arms` maps an arm to the columns that differ from a good run"
    base = dict(model='m', batch_size=16, size=128, ms_reps=[1.]*3, saved_bytes=100., first_loss=2., note='')
    good = {'fastai': dict(ms_reps=[1.2]*3, saved_bytes=120.), UNFUSED: {}, FUSED: dict(ms_reps=[.8]*3, saved_bytes=70.)}
    return pd.DataFrame([dict(base, arm=k, **(good[k] | arms.get(k, {}))) for k in good])

FAILED = dict(ms_reps=[], saved_bytes=math.nan, first_loss=math.nan, note='freezebn_fused failed: boom')

@pytest.mark.parametrize('check,bad', [
    ('fused first loss = unfused', {FUSED: dict(first_loss=2.01)}),
    ('fused first loss = unfused', {FUSED: dict(first_loss=math.nan)}),
    ('fused / unfused bytes for backward', {FUSED: dict(saved_bytes=86.)}),
    ('fused / unfused step time', {FUSED: dict(ms_reps=[.8, .95, .95])}),
    ('fused / unfused step time', {FUSED: FAILED}),
    ('fused / unfused bytes for backward', {UNFUSED: dict(FAILED, note='freezebn failed: boom')}),
])
def test_every_verdict_can_fail(check, bad):
    "Each target passes on a good run and says FAIL on the case it exists to catch (rows made by hand, nothing timed)"
    def verdict(rows):
        v = train_targets(rows)
        return list(v[v.check == check].result)
    assert verdict(group()) == ['PASS']
    assert verdict(group(**bad)) == ['FAIL']

def test_no_fused_arm_no_target(df):
    assert train_targets(df[df.arm != FUSED]).empty
    assert '(no target applies' in train_report(df[df.arm != FUSED], 'here')

def test_csv_and_plot(df, tmp_path):
    write_train_csv(df, tmp_path/'t.csv')
    back = pd.read_csv(tmp_path/'t.csv')
    assert list(back.columns) == TRAIN_CSV_COLUMNS and len(back) == len(df)
    plot_train(df, tmp_path/'t.png')
    assert (tmp_path/'t.png').read_bytes()[:8] == PNG

@pytest.mark.parametrize('kw,msg', [(dict(models=[nn.Linear(2, 2)]), 'not from a module'),
                                    (dict(models=['resnet18', 'no_such_net']), "unknown model 'no_such_net'"),
                                    (dict(models=['missing.pkl']), 'no fastai learner file'),
                                    (dict(models=['resnet18'], bs=[0]), 'batch sizes must be at least 1'),
                                    (dict(models=['resnet18'], warmup=0), 'at least 1 warm-up step')])
def test_bad_requests(kw, msg):
    with pytest.raises(BenchError, match=msg): bench_train(**kw, progress=False)

def cli(*args): return subprocess.run([str(BENCH), *map(str, args)], capture_output=True, text=True)

@pytest.mark.slow
def test_cli_train(tmp_path):
    res = cli('--train', 'resnet18', '--bs', 2, '--size', 32, '--reps', 1, '--warmup', 1, '--min-time', 0, '--no-progress',
              '--csv', tmp_path/'t.csv', '--plot', tmp_path/'t.png')
    assert res.returncode == 0, res.stderr
    for s in ('machine:', 'targets (', 'saved MiB', *TRAIN_ARMS): assert s in res.stdout, s
    if FUSED in TRAIN_ARMS:
        for s in ('fused / unfused bytes for backward', 'fused / unfused step time'): assert s in res.stdout, s
    back = pd.read_csv(tmp_path/'t.csv')
    assert list(back.columns) == TRAIN_CSV_COLUMNS and list(back.arm) == list(TRAIN_ARMS) and back.ms_median.notna().all()
    assert (tmp_path/'t.png').read_bytes()[:8] == PNG

@pytest.mark.slow
def test_cli_train_error(tmp_path):
    res,msg = cli('--train', '--compiled', '--csv', tmp_path/'t.csv'),'--compiled, --trust and --import are for inference'
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert res.returncode != 0 and len(lines) == 1 and lines[0].startswith('fastfold-bench: error:') and msg in lines[0], res.stderr
    assert res.stdout == '' and not (tmp_path/'t.csv').exists()
