"Tests of `fastfold.bench` and the `fastfold-bench` command: short runs (tiny inputs, two repetitions), nothing timed"
import math, os, socket, subprocess, sys, tempfile
os.environ.update(YOLO_OFFLINE='1')
os.environ.setdefault('YOLO_CONFIG_DIR', tempfile.mkdtemp(prefix='fastfold-yolo-')) # ultralytics' settings: not ~/.config
from pathlib import Path
import pandas as pd, pytest, torch
from torch import nn
from fastfold.bench import (CSV_COLUMNS, BenchError, bench, format_table, plot_relative, calibrate_bn, targets,
                            write_csv)
from fastfold.layers import bn_layers

BENCH = Path(sys.executable).parent/'fastfold-bench'
FAST = dict(reps=2, warmup=1, min_time=0, fold_reps=1, progress=False)
VARIANTS = ['original', 'fastfold', 'fx_fuse', 'no_bn']
PNG = b'\x89PNG\r\n\x1a\n'

class Gated(nn.Module):
    "Data-dependent control flow: `torch.fx` cannot trace it, fastfold folds its traceable `body`"
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
    def forward(self, x):
        y = self.body(x)
        return y if y.mean() > 0 else -y

def tiny(c=3):
    m = nn.Sequential(nn.Conv2d(c, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                      nn.BatchNorm1d(8), nn.Linear(8, 4))
    return calibrate_bn(m, torch.randn(4, c, 16, 16, generator=torch.Generator().manual_seed(0)))

def randomized(m): return calibrate_bn(m, torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)))

@pytest.fixture(scope='module')
def df():
    # resnet18: plain BatchNorm2d; mobilenetv3_small_050 (timm): BatchNormAct2d, which `fuse` traces through
    return bench(['resnet18', 'mobilenetv3_small_050', ('gated', randomized(Gated()))], bs=[1, 2], sizes=[32], **FAST)

def row(df, model, variant, bs=1): return df[(df.model == model) & (df.variant == variant) & (df.batch_size == bs)].iloc[0]

def test_rows(df):
    assert len(df) == 3*2*len(VARIANTS)
    assert list(df.variant[:4]) == VARIANTS
    assert set(CSV_COLUMNS) <= set(df.columns)
    assert set(df.device) == {'cpu'} and set(df['size']) == {32}
    timed = df[~(df.variant.eq('fx_fuse') & df.model.eq('gated'))]
    assert timed.ms_median.notna().all() and (timed.ms_median > 0).all()
    assert ((timed.ms_min <= timed.ms_median) & (timed.ms_median <= timed.ms_max)).all()
    assert all(len(ts) == 2 for ts in timed.ms_reps)
    assert (df[df.variant == 'original'].vs_original == 1).all()
    assert (timed.img_s - timed.batch_size*1000/timed.ms_median).abs().max() < 1e-6
    import torchvision
    c = sum(m.num_features for _,m in bn_layers(torchvision.models.resnet18()))  # each BN: weight and bias, c each
    p = {v: row(df, 'resnet18', v).params for v in VARIANTS}
    assert p['original'] - p['fastfold'] == c and p['fastfold'] - p['no_bn'] == c  # folded: one new conv bias per BN
    assert p['fx_fuse'] == p['fastfold']

def test_bn_left(df):
    import timm, torchvision
    n_r18 = len(bn_layers(torchvision.models.resnet18()))
    n_mb = len(bn_layers(timm.create_model('mobilenetv3_small_050')))
    for bs in (1, 2):
        assert row(df, 'resnet18', 'original', bs).bn_left == n_r18 == 20
        assert row(df, 'resnet18', 'fastfold', bs).bn_left == 0
        assert row(df, 'resnet18', 'fx_fuse', bs).bn_left == 0
        assert row(df, 'resnet18', 'no_bn', bs).bn_left == 0
        assert row(df, 'mobilenetv3_small_050', 'original', bs).bn_left == n_mb
        assert row(df, 'mobilenetv3_small_050', 'fx_fuse', bs).bn_left == n_mb  # inlined `batch_norm` calls
        assert row(df, 'mobilenetv3_small_050', 'fastfold', bs).bn_left == 0
    assert row(df, 'gated', 'original').bn_left == 1 and row(df, 'gated', 'fastfold').bn_left == 0

def test_outputs(df):
    for model in ('resnet18', 'mobilenetv3_small_050', 'gated'):
        for bs in (1, 2):
            r = row(df, model, 'fastfold', bs)
            assert r.max_abs_diff <= 1e-4*r.out_scale, (model, bs, r.max_abs_diff, r.out_scale)
            nb = row(df, model, 'no_bn', bs)
            assert nb.max_abs_diff > 1e-2*nb.out_scale   # randomised BN statistics: dropping BN changes the outputs
    r = row(df, 'resnet18', 'fx_fuse')
    assert r.max_abs_diff <= 1e-4*r.out_scale
    assert row(df, 'resnet18', 'original').max_abs_diff == 0

def test_fold_time(df):
    for model in ('resnet18', 'mobilenetv3_small_050'):
        assert row(df, model, 'fastfold').fold_s > 0 and row(df, model, 'fx_fuse').fold_s > 0
        assert math.isnan(row(df, model, 'original').fold_s) and math.isnan(row(df, model, 'no_bn').fold_s)

def test_fx_failure_reported(df):
    r = row(df, 'gated', 'fx_fuse')
    assert math.isnan(r.ms_median) and pd.isna(r.bn_left) and 'TraceError' in r.note
    ff = row(df, 'gated', 'fastfold')
    assert ff.ms_median > 0 and ff.note == 'folded 1/1 BN'
    assert 'TraceError' in format_table(df)

def test_targets(df):
    v = targets(df)
    assert set(v.check) == {'fastfold output = original', 'fastfold / no_bn latency', 'fastfold / fx_fuse latency',
                            'fastfold runs where fx_fuse fails', 'fastfold / fx_fuse fold time'}
    assert v[v.check == 'fastfold runs where fx_fuse fails'].model.tolist() == ['gated', 'gated']
    assert sorted(v[v.check == 'fastfold / fx_fuse fold time'].model) == ['mobilenetv3_small_050', 'resnet18']
    assert set(v[v.check == 'fastfold output = original'].result) == {'PASS'}
    lat = v[v.check == 'fastfold / no_bn latency']
    assert len(lat) == 6 and (lat.measured > 0).all()
    assert ((lat.measured <= 1.02) == (lat.result == 'PASS')).all()

def group(**variants):
    "`bench`'s rows for one model, batch size and size, made by hand: `variants` maps a variant to what differs from a good run"
    base = dict(model='m', batch_size=1, size=16, part='model', ms_reps=[1.]*3, ms_median=1., max_abs_diff=0., out_scale=1.,
                f64_diff=math.nan, fold_s=1., same_detections=None, nms_boxes=None, detections=None, note='')
    return pd.DataFrame([dict(base, variant=k, **kw) for k,kw in variants.items()])

def verdict(df, check):
    v = targets(df)
    return v[v.check == check].result.tolist()

FX_FAILED = dict(ms_reps=[], ms_median=math.nan, note='fx_fuse failed: TraceError')
DET = dict(same_detections=True, nms_boxes=100, detections=10)

@pytest.mark.parametrize('check,good,bad', [
    ('fastfold output = original', {}, dict(fastfold=dict(max_abs_diff=1e-3))),
    ('fastfold output = original', {}, dict(fastfold=dict(ms_reps=[], ms_median=math.nan, max_abs_diff=math.nan, note='fastfold failed: x'))),
    ('fastfold output = original', dict(original=dict(f64_diff=1e-3), fastfold=dict(max_abs_diff=1e-3, f64_diff=1.5e-3)),
     dict(original=dict(f64_diff=1e-3), fastfold=dict(max_abs_diff=1e-3, f64_diff=3e-3))),
    ('fastfold / no_bn latency', {}, dict(fastfold=dict(ms_reps=[1.1]*3))),
    ('fastfold / fx_fuse latency', {}, dict(fx_fuse=dict(ms_reps=[0.9]*3))),
    ('fastfold / fx_fuse fold time', {}, dict(fastfold=dict(fold_s=1.5))),
    ('fastfold runs where fx_fuse fails', dict(fx_fuse=FX_FAILED),
     dict(fx_fuse=FX_FAILED, fastfold=dict(ms_reps=[], ms_median=math.nan, max_abs_diff=math.nan, note='fastfold failed: x'))),
    ('fastfold detections = original', dict(original=DET, fastfold=DET), dict(original=DET, fastfold=dict(DET, same_detections=False))),
    ('fastfold detections = original', dict(original=DET, fastfold=DET), dict(original=DET, fastfold=dict(DET, nms_boxes=99)))])
def test_every_verdict_can_fail(check, good, bad):
    "Each target passes on a good run and says FAIL on the case it exists to catch (rows made by hand, nothing timed)"
    def rows(changes): return group(**{k: changes.get(k, {}) for k in ('original', 'fastfold', 'fx_fuse', 'no_bn')})
    assert verdict(rows(good), check) == ['PASS']
    assert verdict(rows(bad), check) == ['FAIL']

def test_csv_and_plot(df, tmp_path):
    write_csv(df, tmp_path/'b.csv')
    back = pd.read_csv(tmp_path/'b.csv')
    assert list(back.columns) == CSV_COLUMNS
    assert len(back) == len(df)
    assert back[(back.model == 'gated') & (back.variant == 'fx_fuse')].ms_median.isna().all()
    plot_relative(df, tmp_path/'b.png')
    assert (tmp_path/'b.png').read_bytes()[:8] == PNG

def test_compiled():
    d = bench([('tiny', tiny())], bs=[1], sizes=[16], compiled=True, **FAST)
    assert list(d.variant) == VARIANTS + ['compiled', 'fastfold_compiled']
    for v in ('compiled', 'fastfold_compiled'):
        r = row(d, 'tiny', v)
        assert r.note == '' and r.ms_median > 0 and r.fold_s > 0, r.note
        assert r.max_abs_diff <= 1e-4*r.out_scale
    assert row(d, 'tiny', 'fastfold_compiled').bn_left == 0 and row(d, 'tiny', 'compiled').bn_left == 2

def test_learner_file(tmp_path):
    from fastai.data.core import Datasets
    from fastai.learner import Learner
    from fastcore.basics import noop
    dls = Datasets(list(range(4)), tfms=[[noop], [noop]]).dataloaders(bs=2)
    Learner(dls, tiny(c=1), loss_func=nn.CrossEntropyLoss()).export(tmp_path/'learn.pkl')
    name = str(tmp_path/'learn.pkl')
    d = bench([name], bs=[2], sizes=[16], **FAST)
    assert list(d.variant) == VARIANTS and set(d.model) == {name}
    assert row(d, name, 'original', 2).bn_left == 2 and row(d, name, 'fastfold', 2).bn_left == 0
    r = row(d, name, 'fastfold', 2)
    assert r.max_abs_diff <= 1e-4*r.out_scale

@pytest.mark.parametrize('kw,msg', [(dict(models=['resnet18', 'no_such_net']), "unknown model 'no_such_net'"),
                                    (dict(models=['resnet18'], bs=[1, 0]), 'batch sizes must be at least 1'),
                                    (dict(models=['resnet18'], sizes=[0]), 'input sizes must be at least 1'),
                                    (dict(models=['missing.pkl']), 'no fastai learner file'),
                                    (dict(models=['yolov99n.yaml']), "unknown ultralytics model 'yolov99n.yaml'")])
def test_bad_requests(kw, msg):
    with pytest.raises(BenchError, match=msg): bench(**kw, progress=False)

def test_deploy_variant():
    "A timm model with a `reparameterize` gets `deploy` (timm's `reparameterize_model`): checked, timed, and judged beside fastfold"
    d = bench(['repvgg_a0'], bs=[1], sizes=[32], **FAST)
    assert list(d.variant) == ['original', 'fastfold', 'fx_fuse', 'deploy', 'no_bn']
    dep = row(d, 'repvgg_a0', 'deploy')
    assert dep.bn_left == 0 and dep.ms_median > 0 and dep.fold_s > 0 and dep.note == ''
    assert dep.max_abs_diff <= 1e-4*dep.out_scale
    v = targets(d)
    lat = v[v.check == 'fastfold / deploy latency'].iloc[0]
    assert lat.measured > 0 and lat.goal == '<= 1.05' and (lat.result == 'PASS') == (lat.measured <= 1.05)

def test_ultralytics_by_yaml_name(monkeypatch):
    "An ultralytics model named by its yaml file, built with random weights (nothing downloaded): fastfold folds it with a sample, as fx cannot trace it; `fuse()` is its deploy form"
    def refuse(*a, **k): raise AssertionError('a test tried to reach the network')
    monkeypatch.setattr(socket.socket, 'connect', refuse)
    d = bench(['yolov10n.yaml'], bs=[1], sizes=[64], **FAST)
    ff,dep = row(d, 'yolov10n.yaml', 'fastfold'),row(d, 'yolov10n.yaml', 'deploy')
    assert ff.note.endswith(', with a sample') and ff.bn_left == 0 and ff.max_abs_diff <= 1e-4*ff.out_scale
    assert dep.bn_left == 0 and dep.ms_median > 0
    assert 'returns other tensors than the original' in dep.note # `fuse()` drops YOLOv10's one-to-many head

def cli(*args, cwd=None): return subprocess.run([str(BENCH), *map(str, args)], capture_output=True, text=True, cwd=cwd)

@pytest.mark.slow
def test_cli(tmp_path):
    res = cli('resnet18', '--bs', 1, '--size', 32, '--reps', 2, '--warmup', 1, '--min-time', 0, '--fold-reps', 1, '--no-progress',
              '--csv', tmp_path/'b.csv', '--plot', tmp_path/'b.png')
    assert res.returncode == 0, res.stderr
    for s in ('machine:', 'targets (', 'fastfold / no_bn latency', 'fastfold / fx_fuse fold time', *VARIANTS):
        assert s in res.stdout, s
    back = pd.read_csv(tmp_path/'b.csv')
    assert list(back.columns) == CSV_COLUMNS and len(back) == len(VARIANTS)
    assert (tmp_path/'b.png').read_bytes()[:8] == PNG

ERRORS = [(['no_such_net'], "unknown model 'no_such_net'"), (['resnet18', '--bs', 1, 0], 'batch sizes must be at least 1'),
          (['resnet18', '--bs', -3], 'batch sizes must be at least 1'),
          (['resnet18', '--plot', '/no/such/folder/b.png'], '--plot /no/such/folder/b.png: no folder')]
if not torch.cuda.is_available(): ERRORS.append((['resnet18', '--device', 'cuda'], 'torch.cuda.is_available() is False'))

@pytest.mark.slow
@pytest.mark.parametrize('args,msg', ERRORS, ids=[' '.join(map(str, a)) for a,_ in ERRORS])
def test_cli_errors(args, msg, tmp_path):
    res = cli(*args, '--csv', tmp_path/'b.csv')
    assert res.returncode != 0
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith('fastfold-bench: error:') and msg in lines[0], res.stderr
    assert res.stdout == '' and not (tmp_path/'b.csv').exists()

def test_model_source_once_per_name(monkeypatch):
    "A name's source is found once per run, however many batch sizes and sizes it is timed at"
    import fastfold.bench as fb, fastfold.bench_models as bm
    calls,orig = [],bm.model_source
    def counted(name): calls.append(name); return orig(name)
    monkeypatch.setattr(fb, 'model_source', counted); monkeypatch.setattr(bm, 'model_source', counted)
    bench(['resnet18'], bs=[1, 2], sizes=[16, 24], **FAST)
    assert calls == ['resnet18']
