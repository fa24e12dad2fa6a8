""" The SMP kernel: formula, initialisation, rendering at other sizes, gradients. """
import copy
import math

import pytest
import torch
import torch.nn as nn

from timm_smpconv.layers import SMPConv1d, SMPConv2d, default_n_points, default_radius, render_smp_kernel, rescale_factor


def loop_reference(points, radius, weight, k, normalize, grid=None):
    """The paper's formula evaluated point by point with Python floats (on `grid`, (d, k) coordinates per axis,
    if given)."""
    num_f, num_points, dims = points.shape
    out_chs, in_chs = weight.shape[:2]
    if grid is None:
        grid = [[-1 + 2 * i / (k - 1) for i in range(k)] if k > 1 else [-1.0]] * dims
    else:
        grid = grid.tolist()
    coords = [(a,) for a in grid[0]] if dims == 1 else [(a, b) for a in grid[0] for b in grid[1]]
    out = torch.zeros(out_chs, in_chs, len(coords), dtype=torch.float64)
    for o in range(out_chs):
        f = 0 if num_f == 1 else o
        for qi, q in enumerate(coords):
            gs = []
            for n in range(num_points):
                d = sum(abs(q[j] - points[f, n, j].item()) for j in range(dims))
                gs.append(max(0.0, 1 - d / radius[f, n].item()))
            count = sum(1 for g in gs if g > 0)
            for i in range(in_chs):
                v = sum(g * weight[o, i, n].item() for n, g in enumerate(gs))
                out[o, i, qi] = v / (count + 1e-6) if normalize else v
    return out.reshape([out_chs, in_chs] + [k] * dims)


def test_hand_computed_2d_sum():
    # grid {-1, 0, 1}; one point at the centre with radius 1.5 and weight 2
    points = torch.zeros(1, 1, 2)
    radius = torch.full((1, 1), 1.5)
    weight = torch.full((1, 1, 1), 2.0)
    k = render_smp_kernel(points, radius, weight, 3)[0, 0]
    # centre: g = 1; edge neighbours: L1 distance 1 -> 1 - 1/1.5 = 1/3; corners: distance 2 -> 0
    expected = torch.tensor([[0, 2 / 3, 0], [2 / 3, 2, 2 / 3], [0, 2 / 3, 0]])
    torch.testing.assert_close(k, expected)


def test_hand_computed_2d_normalized():
    # two points with radius 1: (0, 0) weight 3 and (0, 1) weight 1 (row 0 = centre row, col +1)
    points = torch.tensor([[[0., 0.], [0., 1.]]])
    radius = torch.ones(1, 2)
    weight = torch.tensor([[[3., 1.]]])
    summed = render_smp_kernel(points, radius, weight, 3)[0, 0]
    normed = render_smp_kernel(points, radius, weight, 3, normalize=True)[0, 0]
    # at (0, 0): g1 = 1, g2 = 0 (distance 1 = radius) -> sum 3, one point -> 3 / 1
    # at (0, 1): g1 = 0, g2 = 1 -> 1; elsewhere both tents are 0 on this grid
    expected = torch.zeros(3, 3)
    expected[1, 1], expected[1, 2] = 3., 1.
    torch.testing.assert_close(summed, expected)
    torch.testing.assert_close(normed, expected / (1 + 1e-6))
    # radius 2: at (0, 0) g1 = 1, g2 = 0.5 -> sum 3.5, count 2 -> 1.75
    normed2 = render_smp_kernel(points, 2 * radius, weight, 3, normalize=True)[0, 0]
    summed2 = render_smp_kernel(points, 2 * radius, weight, 3)[0, 0]
    assert summed2[1, 1].item() == pytest.approx(3.5)
    assert normed2[1, 1].item() == pytest.approx(1.75, rel=1e-5)
    # at (-1, 0) [row 0, col 1]: g1 = 0.5, g2 = 0 (distance 2) -> 1.5 / 1
    assert normed2[0, 1].item() == pytest.approx(1.5, rel=1e-5)


def test_hand_computed_1d():
    # grid {-1, -0.5, 0, 0.5, 1}; points at 1 (r 0.5, w 4) and 0 (r 1, w 2)
    points = torch.tensor([[[1.0], [0.0]]])
    radius = torch.tensor([[0.5, 1.0]])
    weight = torch.tensor([[[4.0, 2.0]]])
    summed = render_smp_kernel(points, radius, weight, 5)[0, 0]
    normed = render_smp_kernel(points, radius, weight, 5, normalize=True)[0, 0]
    # point 2 gives 0, 1, 2, 1, 0; point 1 gives 0, 0, 0, 0, 4
    torch.testing.assert_close(summed, torch.tensor([0., 1., 2., 1., 4.]))
    torch.testing.assert_close(normed, torch.tensor([0., 1., 2., 1., 4.]) / (1 + 1e-6))


@pytest.mark.parametrize('dims', [1, 2])
@pytest.mark.parametrize('shared', [True, False])
@pytest.mark.parametrize('normalize', [False, True])
def test_render_matches_formula(dims, shared, normalize):
    g = torch.Generator().manual_seed(dims * 10 + shared * 2 + normalize)
    out_chs, in_chs, num_points, k = 3, 2, 5, 7
    num_f = 1 if shared else out_chs
    points = torch.rand(num_f, num_points, dims, generator=g) * 2 - 1
    radius = torch.rand(num_f, num_points, generator=g) * 0.8 + 0.2
    weight = torch.randn(out_chs, in_chs, num_points, generator=g)
    got = render_smp_kernel(points.double(), radius.double(), weight.double(), k, normalize=normalize)
    want = loop_reference(points.double(), radius.double(), weight.double(), k, normalize)
    assert got.shape == want.shape == torch.Size([out_chs, in_chs] + [k] * dims)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    # the layer renders the same thing from its own parameters
    cls = SMPConv2d if dims == 2 else SMPConv1d
    layer = cls(in_chs, out_chs, k, n_points=num_points, shared_points=shared, normalize=normalize).double()
    with torch.no_grad():
        layer.points.copy_(points)
        layer.radius.copy_(radius)
        layer.weight.copy_(weight)
    torch.testing.assert_close(layer.get_weight(), want, rtol=1e-10, atol=1e-10)


def test_orientation_first_coordinate_is_row():
    points = torch.tensor([[[0.5, 0.0]]])
    k = render_smp_kernel(points, torch.full((1, 1), 0.1), torch.ones(1, 1, 1), 33)[0, 0]
    assert divmod(int(k.argmax()), 33) == (24, 16)


@pytest.mark.parametrize('dims,shared', [(2, True), (2, False), (1, True), (1, False)])
def test_gradients_reach_points_radii_weights(dims, shared):
    torch.manual_seed(0)
    cls = SMPConv2d if dims == 2 else SMPConv1d
    layer = cls(4, 4, 9, groups=4 if shared else 1, n_points=6, shared_points=shared, radius=0.6)
    x = torch.randn(2, 4, *([12] * dims))
    layer(x).square().sum().backward()
    for name in ('points', 'radius', 'weight', 'bias'):
        grad = getattr(layer, name).grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_parameter_count_shared_and_per_filter():
    for k, c, n in [(31, 96, None), (13, 768, 20), (5, 8, 3)]:
        layer = SMPConv2d(c, c, k, groups=c, bias=False, n_points=n)
        num_points = n if n is not None else k * k // 4
        assert layer.shared_points
        assert sum(p.numel() for p in layer.parameters()) == (1 + 2 + c) * num_points
    seq = SMPConv1d(30, 30, 101, groups=30, bias=False)
    assert sum(p.numel() for p in seq.parameters()) == (1 + 1 + 30) * 30
    # per filter (small-scale form): every output filter has its own points: (1 + d + Cin) * Np each
    full = SMPConv2d(3, 24, 33, n_points=16, bias=False)
    assert not full.shared_points
    assert sum(p.numel() for p in full.parameters()) == 24 * (1 + 2 + 3) * 16 == 2304


def test_initialisation_defaults():
    torch.manual_seed(0)
    layer = SMPConv2d(256, 256, 31, groups=256)
    assert layer.n_points == default_n_points(31, 2) == 240
    assert layer.radius.shape == (1, 240) and torch.allclose(layer.radius, torch.tensor(4 / 31))
    assert default_radius(31, 2) == pytest.approx(0.129, abs=1e-3)
    assert layer.points.abs().max() <= 1
    assert layer.points.std().item() == pytest.approx(0.2, rel=0.15)
    assert layer.weight.std().item() == pytest.approx(0.02, rel=0.05)
    small = SMPConv2d(8, 8, 33, groups=8, n_points=4096, point_std=0.05)
    assert small.points.std().item() == pytest.approx(0.05, rel=0.1)
    # causal 1D: p = 2 t + 1 with t ~ truncnormal(0, 0.1) on [-1, 0] -> points just below +1
    seq = SMPConv1d(8, 8, 101, groups=8, n_points=4096)
    assert seq.n_points == 4096 and default_n_points(101, 1) == 30
    assert seq.points.max() <= 1 and seq.points.min() >= -1
    assert seq.points.mean().item() == pytest.approx(1 - 2 * 0.1 * math.sqrt(2 / math.pi), abs=0.01)
    assert torch.allclose(seq.radius, torch.tensor(2 / 101))


@pytest.mark.parametrize('dims', [1, 2])
def test_render_at_2k_minus_1_matches_after_rescale(dims):
    torch.manual_seed(1)
    cls = SMPConv2d if dims == 2 else SMPConv1d
    k = 17
    layer = cls(3, 3, k, groups=3, n_points=12, radius=0.3)
    coarse = layer.get_weight()
    weight = layer.weight.detach().clone()
    layer.set_kernel_size(2 * k - 1)  # default 'stretch'
    assert rescale_factor(k, 2 * k - 1, dims) == pytest.approx(0.5 ** dims)
    torch.testing.assert_close(layer.weight.detach(), weight * 0.5 ** dims)
    fine = layer.get_weight()
    assert fine.shape[-1] == 2 * k - 1 and int(layer.kernel_size_record) == 2 * k - 1
    sub = fine[..., ::2, ::2] if dims == 2 else fine[..., ::2]
    torch.testing.assert_close(sub * 2 ** dims, coarse, rtol=1e-5, atol=1e-6)
    # and back: the inverse mapping restores the trained kernel
    layer.set_kernel_size(k)
    torch.testing.assert_close(layer.get_weight(), coarse, rtol=1e-5, atol=1e-6)
    # 'none' keeps the raw function values: at shared grid points they equal the coarse kernel
    layer.set_kernel_size(2 * k - 1, mode='none')
    raw = layer.get_weight()
    torch.testing.assert_close(raw[..., ::2, ::2] if dims == 2 else raw[..., ::2], coarse, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('dims', [1, 2])
def test_extend_mode_zero_pads_the_same_pixel_kernel(dims):
    torch.manual_seed(2)
    cls = SMPConv2d if dims == 2 else SMPConv1d
    layer = cls(4, 4, 11, groups=4, n_points=10, radius=0.3, resize_mode='extend')
    small = layer.get_weight()
    layer.set_kernel_size(21)
    big = layer.get_weight()
    if dims == 2:
        torch.testing.assert_close(big[..., 5:-5, 5:-5], small, rtol=1e-4, atol=1e-6)
        assert big[..., :5, :].abs().max() < 1e-6 and big[..., :, -5:].abs().max() < 1e-6
    else:
        torch.testing.assert_close(big[..., 5:-5], small, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match='resize mode'):
        layer.set_kernel_size(11, mode='crop')
    with pytest.raises(ValueError, match='resize mode'):
        cls(4, 4, 11, resize_mode='crop')


@pytest.mark.parametrize('mode', ['stretch', 'extend', 'none'])
def test_state_dict_saved_at_another_size_is_resized_on_load(mode):
    torch.manual_seed(3)
    src = SMPConv2d(4, 4, 13, groups=4, n_points=20, radius=0.25)
    dst = SMPConv2d(4, 4, 25, groups=4, n_points=20, resize_mode=mode)
    dst.load_state_dict(src.state_dict())
    ref = SMPConv2d(4, 4, 13, groups=4, n_points=20)
    ref.load_state_dict(src.state_dict())
    ref.set_kernel_size(25, mode=mode)
    torch.testing.assert_close(dst.get_weight(), ref.get_weight())
    assert int(dst.kernel_size_record) == 25
    # the source is untouched, and a same-size load is exact
    same = SMPConv2d(4, 4, 13, groups=4, n_points=20)
    same.load_state_dict(src.state_dict())
    torch.testing.assert_close(same.get_weight(), src.get_weight())


def test_rescaled_kernel_gives_same_response_on_resized_input():
    """A smooth image at twice the sampling density, convolved with the rescaled kernel, gives the
    response of the original kernel on the original image (up to the discretisation error)."""
    torch.manual_seed(0)
    layer = SMPConv2d(1, 1, 9, n_points=8, radius=0.6, bias=False)

    def image(n):
        t = torch.linspace(-3, 3, n)
        return torch.exp(-(t[:, None] ** 2 + (t[None, :] - 0.5) ** 2) / 2).reshape(1, 1, n, n)

    with torch.no_grad():
        y_coarse = layer(image(33))
        layer.set_kernel_size(17)  # 2 * 9 - 1
        y_fine = layer(image(65))
    ratio = (y_fine[..., ::2, ::2] - y_coarse).abs().max() / y_coarse.abs().max()
    assert ratio < 0.05
    # the unscaled kernel would be ~4x too strong
    assert (y_fine[..., ::2, ::2].abs().max() / y_coarse.abs().max()).item() == pytest.approx(1, abs=0.05)


def _rounded_grid(k, dims, dtype=torch.float16):
    """Per-axis coordinates as a half-precision file stores the authors' grid: linspace rounded to `dtype`."""
    return torch.linspace(-1, 1, k).to(dtype).float().expand(dims, k).clone()


@pytest.mark.parametrize('dims', [1, 2])
def test_render_on_a_given_grid_matches_formula(dims):
    g = torch.Generator().manual_seed(7)
    k, num_points = 9, 6
    points = torch.rand(1, num_points, dims, generator=g) * 2 - 1
    radius = torch.rand(1, num_points, generator=g) * 0.5 + 0.2
    weight = torch.randn(3, 1, num_points, generator=g)
    grid = torch.sort(torch.rand(dims, k, generator=g) * 2 - 1).values  # an arbitrary grid, other per axis
    got = render_smp_kernel(points.double(), radius.double(), weight.double(), k, grid=grid.double())
    torch.testing.assert_close(got, loop_reference(points.double(), radius.double(), weight.double(), k, False, grid),
                               rtol=1e-10, atol=1e-10)
    # the linspace as an explicit grid is the default rendering, bit for bit; cropping crops the grid
    lin = torch.linspace(-1, 1, k).expand(dims, k)
    default = render_smp_kernel(points, radius, weight, k)
    assert torch.equal(render_smp_kernel(points, radius, weight, k, grid=lin), default)
    inner = render_smp_kernel(points, radius, weight, k, grid=grid, crop=2)
    full = render_smp_kernel(points, radius, weight, k, grid=grid)
    assert torch.equal(inner, full[..., 2:-2, 2:-2] if dims == 2 else full[..., 2:-2])


def _grid_state(layer, grid):
    sd = layer.state_dict()
    sd['render_grid'] = grid
    return sd


def test_layer_render_grid_is_optional_state():
    torch.manual_seed(4)
    k = 31
    layer = SMPConv2d(6, 6, k, groups=6, n_points=40, radius=0.2).eval()
    # fresh layers render on linspace and their state dict has no grid entry
    assert layer.render_grid is None and 'render_grid' not in layer.state_dict()
    exact = layer.get_weight()
    grid = _rounded_grid(k, 2)
    sd = _grid_state(layer, grid)
    loaded = SMPConv2d(6, 6, k, groups=6, n_points=40).eval()
    loaded.load_state_dict(sd)
    want = render_smp_kernel(layer.points, layer.radius, layer.weight, k, grid=grid)
    assert torch.equal(loaded.render_grid, grid) and torch.equal(loaded.get_weight(), want)
    assert not torch.equal(want, exact) and 'render_grid=stored' in repr(loaded)
    # it survives our state dict, deepcopy and dtype moves; fusing bakes it in
    again = SMPConv2d(6, 6, k, groups=6, n_points=40).eval()
    again.load_state_dict(loaded.state_dict())
    assert torch.equal(again.get_weight(), want)
    assert torch.equal(copy.deepcopy(loaded).get_weight(), want)
    assert loaded.double().render_grid.dtype == torch.float64
    loaded.float()
    x = torch.randn(2, 6, 20, 20)
    with torch.no_grad():
        y = loaded(x)
        torch.testing.assert_close(loaded.fuse()(x), y)
        torch.testing.assert_close(torch.jit.script(loaded)(x), y)
        cropped = SMPConv2d(6, 6, k, groups=6, n_points=40, crop_to_support=True).eval()
        cropped.load_state_dict(sd)
        torch.testing.assert_close(cropped(x), y)
    # a state dict without a grid puts the layer back on linspace; the eval-mode kernel cache follows the grid
    with torch.no_grad():
        loaded.load_state_dict(layer.state_dict())
        assert loaded.render_grid is None and torch.equal(loaded.get_weight(), exact)
        loaded.render_grid = grid.clone()
        assert torch.equal(loaded.get_weight(), want)
    # a grid of the wrong shape is named like any other mis-sized entry
    bad = _grid_state(layer, torch.zeros(2, k + 2))
    with pytest.raises(RuntimeError, match='size mismatch for render_grid'):
        SMPConv2d(6, 6, k, groups=6, n_points=40).load_state_dict(bad)


def test_render_grid_dropped_at_another_kernel_size():
    """A grid stored for size k is meaningless at another size: resizing renders on the exact linspace."""
    torch.manual_seed(5)
    src = SMPConv2d(4, 4, 13, groups=4, n_points=20, radius=0.25)
    sd = _grid_state(src, _rounded_grid(13, 2, torch.bfloat16))
    big = SMPConv2d(4, 4, 25, groups=4, n_points=20)
    big.load_state_dict(sd)
    ref = SMPConv2d(4, 4, 25, groups=4, n_points=20)
    ref.load_state_dict(src.state_dict())
    assert big.render_grid is None and 'render_grid' not in big.state_dict()
    assert torch.equal(big.get_weight(), ref.get_weight())
    same = SMPConv2d(4, 4, 13, groups=4, n_points=20)
    same.load_state_dict(sd)
    assert same.render_grid is not None
    same.set_kernel_size(13)  # the same size keeps it
    assert same.render_grid is not None
    same.set_kernel_size(25)
    assert same.render_grid is None and torch.equal(same.get_weight(), ref.get_weight())


def test_render_grid_on_meta_device_and_1d():
    with torch.device('meta'):
        layer = SMPConv2d(4, 4, 9, groups=4, n_points=8)
    src = SMPConv2d(4, 4, 9, groups=4, n_points=8)
    sd = _grid_state(src, _rounded_grid(9, 2))
    layer.load_state_dict(sd, assign=True)
    assert layer.render_grid.device.type == 'cpu'
    assert torch.equal(layer.get_weight(), render_smp_kernel(src.points, src.radius, src.weight, 9, grid=sd['render_grid']))
    seq = SMPConv1d(3, 3, 17, groups=3, n_points=5)
    seq.load_state_dict(_grid_state(seq, _rounded_grid(17, 1)))
    want = render_smp_kernel(seq.points, seq.radius, seq.weight, 17, grid=_rounded_grid(17, 1))
    assert seq.render_grid.shape == (1, 17) and torch.equal(seq.get_weight(), want)


def test_flops_unchanged_by_a_render_grid():
    from timm_smpconv import flops
    torch.manual_seed(6)
    plain = nn.Sequential(SMPConv2d(4, 4, 15, groups=4, n_points=30))
    gridded = copy.deepcopy(plain)
    gridded[0].load_state_dict(_grid_state(plain[0], _rounded_grid(15, 2)))
    assert gridded[0].render_grid is not None
    a = flops.count_flops(plain, img_size=16, in_chans=4)
    b = flops.count_flops(gridded, img_size=16, in_chans=4)
    assert a['kernel_gen'] > 0 and a == b


def test_render_grid_is_exported_as_a_buffer():
    torch.manual_seed(8)
    layer = SMPConv2d(4, 4, 15, groups=4, n_points=30).eval()
    layer.load_state_dict(_grid_state(layer, _rounded_grid(15, 2)))
    x = torch.randn(2, 4, 20, 20)
    with torch.no_grad():
        ep = torch.export.export(layer, (x,))
        assert 'render_grid' in ep.graph_signature.buffers
        torch.testing.assert_close(ep.module()(x), layer(x))
