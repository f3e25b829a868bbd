"Tests of `fastfold-bench` on torchvision's detection, segmentation and video models: short runs (small inputs, one repetition), nothing timed"
import math
import pandas as pd, pytest, torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d
from fastfold.bench import (CSV_COLUMNS, BenchError, bench, format_table, model_source, targets, write_csv, load_model,
                            calibrate_bn, model_input, model_task, to_frozen_batchnorm2d, frozen_when_trained, equal_work,
                            set_image_size, counting_nms, match_detections)
from fastfold.layers import bn_layers

FAST = dict(reps=1, warmup=1, min_time=0, fold_reps=1, progress=False)
VARIANTS = ['original', 'fastfold', 'fx_fuse', 'no_bn']
DET,SEG = 'fasterrcnn_mobilenet_v3_large_fpn','lraspp_mobilenet_v3_large'

@pytest.fixture(scope='module')
def df():
    return bench([DET, SEG], bs=[2], sizes=[96], **FAST)

def rows(df, model, part='model'): return df[(df.model == model) & (df.part == part)].set_index('variant')

def test_rows(df):
    for m in (DET, SEG):
        for part in ('model', 'backbone'):
            r = rows(df, m, part)
            assert list(r.index) == VARIANTS, (m, part)
            assert set(r['size']) == {96} and set(r.batch_size) == {2}
    assert set(CSV_COLUMNS) <= set(df.columns)
    timed = df[~((df.variant == 'fx_fuse') & (df.model == DET) & (df.part == 'model'))]
    assert (timed.ms_median > 0).all() and all(len(ts) == 1 for ts in timed.ms_reps)
    assert timed.params.notna().all() and timed.bn_left.notna().all()

def test_detector(df):
    r = rows(df, DET)
    n_bn = len(bn_layers(load_model(DET)))
    assert r.loc['original'].bn_left == n_bn == 46 and r.loc['fastfold'].bn_left == 0 and r.loc['no_bn'].bn_left == 0
    assert 'TraceError' in r.loc['fx_fuse'].note and math.isnan(r.loc['fx_fuse'].ms_median)  # the detector does not trace
    assert r.loc['fastfold'].note == f'folded {n_bn}/{n_bn} BN'
    # the same work: every candidate box through NMS, as many for the folded model as for the original
    assert r.loc['original'].nms_boxes == r.loc['fastfold'].nms_boxes > 2*1000
    assert r.loc['original'].detections == r.loc['fastfold'].detections == 2*100  # detections_per_img, both images
    assert r.loc['original'].same_detections is True and r.loc['fastfold'].same_detections is True
    assert r.loc['no_bn'].same_detections is False and 'detections differ' in r.loc['no_bn'].note  # BN does real work
    b = rows(df, DET, 'backbone')
    assert b.loc['original'].bn_left == n_bn and b.loc['fastfold'].bn_left == 0
    # the fpn backbone traces, but `fuse` inlines FrozenBatchNorm2d's arithmetic instead of folding it
    assert b.loc['fx_fuse'].bn_left == n_bn and b.loc['fx_fuse'].params == b.loc['original'].params
    for v in ('fastfold', 'fx_fuse'): assert b.loc[v].max_abs_diff <= 1e-4*b.loc[v].out_scale, v
    assert b.loc['no_bn'].max_abs_diff > 1e-2*b.loc['no_bn'].out_scale
    assert b.nms_boxes.isna().all() and b.same_detections.isna().all()
    assert b.loc['original'].params < r.loc['original'].params  # the backbone is a part of the whole (no timed assertion: the machine is shared)

def test_segmentation(df):
    for part in ('model', 'backbone'):
        r = rows(df, SEG, part)
        assert r.loc['original'].bn_left > 0 and r.loc['fastfold'].bn_left == 0
        for v in ('fastfold', 'fx_fuse'): assert r.loc[v].max_abs_diff <= 1e-4*r.loc[v].out_scale, (part, v)
        assert r.nms_boxes.isna().all()

def test_targets_and_csv(df, tmp_path):
    v = targets(df)
    d = v[v.check == 'fastfold detections = original']
    assert d.model.tolist() == [DET] and d.result.tolist() == ['PASS'] and d.measured.tolist() == [200]
    assert set(v[(v.check == 'fastfold output = original')].part) == {'model', 'backbone'}
    assert v[v.check == 'fastfold runs where fx_fuse fails'].model.tolist() == [DET]
    bad = df.copy()
    bad.loc[(bad.model == DET) & (bad.part == 'model') & (bad.variant == 'fastfold'), 'same_detections'] = False
    assert targets(bad).query("check == 'fastfold detections = original'").result.tolist() == ['FAIL']
    bad = df.copy()  # the same detections, but from other work: fails too
    bad.loc[(bad.model == DET) & (bad.part == 'model') & (bad.variant == 'fastfold'), 'nms_boxes'] -= 1
    assert targets(bad).query("check == 'fastfold detections = original'").result.tolist() == ['FAIL']
    write_csv(df, tmp_path/'b.csv')
    back = pd.read_csv(tmp_path/'b.csv')
    assert list(back.columns) == CSV_COLUMNS and len(back) == len(df) == 16
    det = back[(back.model == DET) & (back.part == 'model') & (back.variant != 'fx_fuse')]
    assert det.nms_boxes.notna().all() and det.detections.notna().all() and det.same_detections.notna().all()
    t = format_table(df)
    assert 'backbone' in t and 'NMS in' in t and 'same dets' in t

def test_frozen_bn_as_with_weights():
    "Built by name, fasterrcnn_resnet50_fpn has the FrozenBatchNorm2d torchvision gives it when weights are loaded"
    from fastfold.bench import prepared_model
    assert frozen_when_trained('fasterrcnn_resnet50_fpn') and not frozen_when_trained('ssdlite320_mobilenet_v3_large')
    assert frozen_when_trained('fasterrcnn_mobilenet_v3_large_320_fpn')  # its builder calls a helper that decides
    _,m,task = prepared_model('fasterrcnn_mobilenet_v3_large_320_fpn', 'torchvision', 0, 64, 'cpu')
    assert task == 'detection' and {type(b) for _,b in bn_layers(m)} == {FrozenBatchNorm2d}
    _,m,_ = prepared_model('ssdlite320_mobilenet_v3_large', 'torchvision', 0, 64, 'cpu')
    assert {type(b) for _,b in bn_layers(m)} == {nn.BatchNorm2d}
    d = bench(['fasterrcnn_mobilenet_v3_large_320_fpn'], bs=[1], sizes=[64], **FAST)
    r = d[d.part == 'model'].set_index('variant')
    assert r.loc['original'].bn_left == 46 and r.loc['fastfold'].bn_left == 0 and r.loc['original'].same_detections
    m = load_model('fasterrcnn_mobilenet_v3_large_320_fpn')
    assert {type(b) for _,b in bn_layers(m)} == {nn.BatchNorm2d}
    assert {type(b) for _,b in bn_layers(to_frozen_batchnorm2d(m))} == {FrozenBatchNorm2d}

def test_given_detector_left_alone():
    m = load_model('ssdlite320_mobilenet_v3_large')
    calibrate_bn(m, model_input('detection', 2, 64))
    thresh,fixed = m.score_thresh,m.transform.fixed_size
    d = bench([('ssd', m)], bs=[1], sizes=[64], **FAST)
    assert (m.score_thresh, m.transform.fixed_size) == (thresh, fixed)   # bench set them on its own copy
    r = d[d.part == 'model'].set_index('variant')
    assert r.loc['fastfold'].same_detections and r.loc['original'].nms_boxes > 0

def test_equal_work_and_size():
    m = load_model(DET)
    assert m.roi_heads.score_thresh == 0.05 and m.transform.min_size == (800,)
    equal_work(set_image_size(m, 128))
    assert m.roi_heads.score_thresh == 0 and m.transform.min_size == (128,) and m.transform.max_size == 128
    x = model_input('detection', 1, 128)
    with torch.inference_mode(): xb,_ = m.transform(x)
    assert xb.tensors.shape[-2:] == (128, 128)
    with counting_nms() as n, torch.inference_mode(): out = m(x)
    assert len(n) == 2 and len(out[0]['boxes']) == m.roi_heads.detections_per_img  # RPN, then the boxes of every class

def test_match_detections_misses():
    a = dict(boxes=torch.tensor([[0., 0, 10, 10]]), labels=torch.tensor([1]), scores=torch.tensor([.5]))
    b = dict(boxes=torch.tensor([[0., 0, 10, 10]]), labels=torch.tensor([1]), scores=torch.tensor([.5003]))
    assert match_detections([a], [a]) == (1, 1, 1)
    assert match_detections([a], [b]) == (1, 1, 0)  # a score off by 3e-4
    assert match_detections([a], [a, a]) == (1, 2, 0)  # another number of images

def test_video():
    assert model_task(load_model('r3d_18')) == 'video'
    d = bench(['r3d_18'], bs=[1], sizes=[32], **FAST)
    r = d.set_index('variant')
    assert set(d.part) == {'model'} and r.loc['original'].bn_left > 0 and r.loc['fastfold'].bn_left == 0
    assert r.loc['fastfold'].max_abs_diff <= 1e-4*r.loc['fastfold'].out_scale

@pytest.mark.parametrize('name,msg', [('no_such_net', "unknown model 'no_such_net': not a torchvision model"),
                                      ('raft_small', "'raft_small' is a torchvision optical flow model")])
def test_refused(name, msg):
    with pytest.raises(BenchError, match=msg): bench([DET, name], **FAST)
    with pytest.raises(BenchError, match=msg): model_source(name)

def test_wrong_input_one_line():
    with pytest.raises(BenchError, match=r'mvit_v2_s fails on a \(4, 3, 8, 32, 32\) input'): bench(['mvit_v2_s'], bs=[1], sizes=[32], **FAST)

def test_rounding_criterion(df):
    "A fold further from float64 than twice the original's float32 error, and off by more than 1e-4, fails"
    seg = (df.model == SEG) & (df.part == 'model')
    o = df[seg & (df.variant == 'original')].iloc[0]
    assert o.f64_diff > 0 and df[seg].f64_diff.notna().all()
    def verdict(diff, f64):
        bad = df.copy()
        ff = seg & (bad.variant == 'fastfold')
        bad.loc[ff, 'max_abs_diff'] = diff*o.out_scale
        bad.loc[ff, 'f64_diff'] = f64*o.f64_diff
        v = targets(bad)
        return v[(v.check == 'fastfold output = original') & (v.model == SEG) & (v.part == 'model')].result.item()
    assert verdict(1e-3, 1.5) == 'PASS'   # off by more than 1e-4, but as close to float64 as the original
    assert verdict(1e-3, 3) == 'FAIL'
    assert verdict(1e-5, 3) == 'PASS'     # within 1e-4 of the largest output
