import torch, torchdiv
from torchdiv._core import walk
import torchdiv._exact.chain as C
n = 10000; D = 4
orig = walk.walked
hits = []
def spy(c):
    try: return orig(c)
    except walk.GraphTooDeep: hits.append(c); raise
walk.walked = spy
class W(torch.nn.Module):
    def __init__(s):
        super().__init__(); s.ls = torch.nn.ModuleList([torch.nn.Linear(D, D) for _ in range(n)])
    def forward(s, z):
        return z + 0.001 * torch.stack([l(z) for l in s.ls]).sum(0)
net = W(); x = torch.randn(8, D)
for i in range(3): torchdiv.divergence(net, x)
xx = x.clone().requires_grad_(); y = net(xx)
print("nodes", sum(1 for _ in walk.nodes(y.grad_fn)), "stopped", hits)
