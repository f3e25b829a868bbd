"""One rank of the two-process DDP test of `FreezeBN` (see `test_freeze_ddp.py`).

Run as `torchrun --nproc_per_node 2 ddp_freeze_worker.py OUT_DIR`: trains a tiny Learner for one epoch with
`FreezeBN()` (which fuses by default) inside `learn.distrib_ctx(sync_bn=False, cpu=True)` (accelerate then uses gloo on
CPU), then the same fit from the same weights and data with `FreezeBN(fuse=False)`, and saves what the test checks to
`OUT_DIR/rank{RANK}.pt`. (`sync_bn=True` needs GPUs: DDP refuses `SyncBatchNorm` on CPU.)
"""
import os, sys
from pathlib import Path
import torch, torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import TensorDataset
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.callback.core import Callback
from fastai.torch_core import set_seed
from fastai.distributed import DistributedDL  # also patches `Learner.distrib_ctx`
from fastfold.freeze import FreezeBN, freezable_bn_layers

def _cpu_broadcast(self, t, rank):
    "`DistributedDL._broadcast` without its `.cuda()`: gloo broadcasts CPU tensors (NCCL needed CUDA ones)"
    t = torch.LongTensor(t)
    dist.broadcast(t, rank)
    return t.tolist()

DistributedDL._broadcast = _cpu_broadcast  # this test's CPU-only patch; fastfold itself patches nothing in fastai

class DDPProbe(Callback):
    "At every training batch: the model's wrapper, its BN modes, and which parameters DDP synchronises"
    order = 50
    def before_fit(self): self.modes,self.wrappers,self.ddp_params,self.inputs = [],set(),set(),[]
    def after_pred(self):
        if not self.training: return
        m = self.learn.model
        self.wrappers.add(type(m).__name__)
        self.modes += [bn.training for bn in freezable_bn_layers(m)]
        # DDP builds its reducer over the parameters that require grad when it is created
        if isinstance(m, DistributedDataParallel): self.ddp_params |= {id(p) for p in m._module_parameters if p.requires_grad}
        self.inputs.append(self.xb[0].sum().item())

def tiny_net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3,8,3,padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8,8,3,padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.BatchNorm1d(8), nn.Linear(8,2))
    with torch.no_grad():   # statistics and parameters as a pretrained model would have them
        for bn in freezable_bn_layers(net):
            bn.running_mean.uniform_(-1,1); bn.running_var.uniform_(0.5,2); bn.weight.uniform_(0.5,1.5); bn.bias.uniform_(-0.5,0.5)
    return net

def synth_dls():
    g = torch.Generator().manual_seed(0)  # the same data on both ranks; `DistributedDL` gives each rank half
    def ds(n):
        x = torch.randn(n, 3, 8, 8, generator=g)
        return TensorDataset(x, (x[:,0].mean((1,2)) > x[:,1].mean((1,2))).long())
    return DataLoaders.from_dsets(ds(64), ds(16), bs=4, device='cpu')

def unfused_fit():
    "The same fit from the same weights and data: the final state_dict, what FreezeBN fused, any `forward` left on a module"
    set_seed(0)
    model = tiny_net()
    learn = Learner(synth_dls(), model, loss_func=CrossEntropyLossFlat(), lr=1e-2, cbs=FreezeBN(fuse=False))
    with learn.distrib_ctx(sync_bn=False, cpu=True): learn.fit(1)
    return dict(after={k:v.clone() for k,v in learn.model.state_dict().items()}, fused=learn.freeze_bn.fused,
                forward_left=any('forward' in vars(m) for m in learn.model.modules()))

if __name__ == '__main__':
    out,rank = Path(sys.argv[1]),int(os.environ['RANK'])
    torch.set_num_threads(1)
    set_seed(0)
    model = tiny_net()
    bn_param_ids = {id(p) for bn in freezable_bn_layers(model) for p in bn.parameters()}
    probe = DDPProbe()
    learn = Learner(synth_dls(), model, loss_func=CrossEntropyLossFlat(), lr=1e-2, cbs=[FreezeBN(), probe])
    before,flags0 = {k:v.clone() for k,v in model.state_dict().items()},[p.requires_grad for p in model.parameters()]
    with learn.distrib_ctx(sync_bn=False, cpu=True): learn.fit(1)
    torch.save(dict(world_size=dist.get_world_size() if dist.is_initialized() else 1,
                    backend=dist.get_backend() if dist.is_initialized() else None,
                    before=before, after={k:v.clone() for k,v in learn.model.state_dict().items()},
                    bn_keys=[k for k in before if any(k.startswith(f'{n}.') for n,m in model.named_modules() if m in freezable_bn_layers(model))],
                    modes=probe.modes, wrappers=sorted(probe.wrappers), inputs=probe.inputs,
                    n_ddp_params=len(probe.ddp_params), n_params=len(list(model.parameters())),
                    ddp_has_bn_params=bool(probe.ddp_params & bn_param_ids),
                    flags_restored=[p.requires_grad for p in learn.model.parameters()] == flags0,
                    unwrapped=learn.model is model, fused=learn.freeze_bn.fused,
                    forward_left=any('forward' in vars(m) for m in learn.model.modules()),
                    unfused=unfused_fit()),
               out/f'rank{rank}.pt')
