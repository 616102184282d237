"""recalibrate: exact population statistics over a stream of batches (precise BN)."""
import io
import threading

import _bounds_extra as BX
import _cases as K
import numpy as np
import pytest

import normkit
from normkit import recalibration as R

pytestmark = pytest.mark.filterwarnings("ignore::normkit.UnstableBatchStatisticsWarning")


def _population(batches, axis=1):
    """float64 mean and unbiased variance over the concatenation of the batches."""
    moved = [np.moveaxis(np.asarray(b, np.float64), axis, -1) for b in batches]
    flat = np.concatenate([m.reshape(-1, m.shape[-1]) for m in moved])
    return flat.mean(axis=0), flat.var(axis=0, ddof=1)


def _rows(batches, axis=1):
    """(C, all values of that channel) over the concatenation of the batches."""
    moved = [np.moveaxis(np.asarray(b, np.float64), axis, 0) for b in batches]
    return np.concatenate([m.reshape(m.shape[0], -1) for m in moved], axis=1)


def _population_bounds(batches, dtype, axis=1, sides=1):
    """Bounds of recalibrate's (mean, unbiased var) against _population: both merge the
    same values in float64 (Chan et al.: the merged mean within BX.bound_merged_mean,
    the merged M2 within K.bound_m2, / (n - 1)), stored into running buffers of
    ``dtype`` (one rounding, u_d of the value). ``sides``: how many recalibrations
    are compared (2 when comparing two of them with each other)."""
    rows = _rows(batches, axis)
    n = rows.shape[1]
    mean, var = rows.mean(axis=1), rows.var(axis=1, ddof=1)
    u_d = K.unit_roundoff(dtype)
    m_bound = BX.bound_merged_mean(np.abs(rows).mean(axis=1), n) + u_d * np.abs(mean)
    v_bound = BX.bound_merged_var(rows, 1) * n / (n - 1) + u_d * var
    return sides * m_bound, sides * v_bound


def test_single_layer_exact_merge_uneven_batches(rng):
    bn = normkit.BatchNorm(4)
    batches = [rng.standard_normal((n, 4, 5, 3)).astype(np.float32) * 3 + 7
               for n in (1, 5, 2, 9)]
    summary = normkit.recalibrate(bn, batches)
    mean, var = _population(batches)
    m_bound, v_bound = _population_bounds(batches, bn.running_mean.dtype)
    K.assert_within(bn.running_mean, mean, m_bound, "running_mean")
    K.assert_within(bn.running_var, var, v_bound, "running_var")
    assert summary == {0: 17 * 15}
    assert bn.num_batches_tracked == 4
    assert bn.training                        # mode untouched


def test_not_an_exponential_average(rng):
    """Order does not matter and early batches count as much as late ones."""
    a, b = normkit.BatchNorm(3), normkit.BatchNorm(3)
    batches = [rng.standard_normal((4, 3, 6)) + i for i in range(6)]
    normkit.recalibrate(a, batches)
    normkit.recalibrate(b, batches[::-1])
    m_bound, v_bound = _population_bounds(batches, a.running_mean.dtype, sides=2)
    K.assert_within(a.running_mean, b.running_mean, m_bound, "running_mean, two orders")
    K.assert_within(a.running_var, b.running_var, v_bound, "running_var, two orders")
    # every batch weighs the same: the population mean (an exponential average of the
    # batch means 0..5 would be far from it), within the one-side bound
    mean, _ = _population(batches)
    K.assert_within(a.running_mean, mean, m_bound / 2, "equal weights")


def test_catastrophic_cancellation_is_avoided():
    """mean 1e4, std 1: merged in float64 around each batch mean, the variance is right."""
    rng = np.random.default_rng(7)
    batches = [(rng.standard_normal((8, 2, 50)) + 1e4).astype(np.float32) for _ in range(20)]
    bn = normkit.BatchNorm(2, dtype=np.float64)
    normkit.recalibrate(bn, batches)
    _, var = _population(batches)
    # Chan's merge bound for kappa ~ 1e4, n = 8000 values (~4e-8 relative);
    # E[x^2] - E[x]^2 would be off by ~n u kappa^2 ~ 0.1 relative
    K.assert_within(bn.running_var, var, _population_bounds(batches, np.float64)[1],
                    "running_var")


def test_channels_last_and_dict_of_layers(rng):
    layers = {"a": normkit.BatchNorm(3, axis=-1), "b": normkit.BatchNorm(5)}
    batches = [{"a": rng.standard_normal((4, 6, 3)), "b": rng.standard_normal((2, 5))}
               for _ in range(3)]
    batches.append({"a": rng.standard_normal((1, 2, 3))})          # subsets are fine
    summary = normkit.recalibrate(layers, iter(batches))           # no len(): fine
    mean_a, var_a = _population([b["a"] for b in batches], axis=-1)
    mean_b, var_b = _population([b["b"] for b in batches[:3]])
    bounds_a = _population_bounds([b["a"] for b in batches], np.float32, axis=-1)
    bounds_b = _population_bounds([b["b"] for b in batches[:3]], np.float32)
    K.assert_within(layers["a"].running_mean, mean_a, bounds_a[0], "a: running_mean")
    K.assert_within(layers["a"].running_var, var_a, bounds_a[1], "a: running_var")
    K.assert_within(layers["b"].running_var, var_b, bounds_b[1], "b: running_var")
    assert summary == {"a": 3 * 24 + 2, "b": 6}
    assert layers["a"].num_batches_tracked == 4 and layers["b"].num_batches_tracked == 3


def test_list_of_layers_and_num_batches(rng):
    layers = [normkit.BatchNorm(2), normkit.BatchNorm(3)]
    pulled = []

    def endless():
        while True:
            item = [rng.standard_normal((4, 2)), rng.standard_normal((4, 3, 2))]
            pulled.append(item)
            yield item

    normkit.recalibrate(layers, endless(), num_batches=5)
    assert len(pulled) == 5                       # no batch fetched beyond the limit
    mean, var = _population([p[1] for p in pulled])
    m_bound, v_bound = _population_bounds([p[1] for p in pulled], np.float32)
    K.assert_within(layers[1].running_mean, mean, m_bound, "running_mean")
    K.assert_within(layers[1].running_var, var, v_bound, "running_var")


class TinyNet:
    """A user's model: two BatchNorms with a nonlinearity in between."""

    def __init__(self):
        self.bn1 = normkit.BatchNorm(3)
        self.bn2 = normkit.BatchNorm(3)
        self.bn1.weight[:] = [1.0, 2.0, 3.0]
        self.bn1.bias[:] = [0.5, -1.0, 2.0]
        self.bn1.name = "bn1"

    def forward(self, x):
        return self.bn2(np.maximum(self.bn1(x), 0) * 2 + 1)


def _hand_bn1(net, x):
    """bn1's train-mode output, in float64."""
    x = np.asarray(x, np.float64)
    mean = x.mean(axis=(0, 2), keepdims=True)
    var = x.var(axis=(0, 2), keepdims=True)
    return (x - mean) / np.sqrt(var + net.bn1.eps) * net.bn1.weight[:, None] \
        + net.bn1.bias[:, None]


def _expected_inputs2(net, batches):
    return [np.maximum(_hand_bn1(net, x), 0) * 2 + 1 for x in batches]


def _expected_net_stats(net, batches):
    """Train-mode forward, computed by hand: bn2 sees bn1's batch-normalized output."""
    return _population(batches), _population(_expected_inputs2(net, batches))


@pytest.mark.parametrize("explicit", [False, True])
def test_callable_forward(rng, explicit):
    net = TinyNet()
    net.bn1.eval()                        # recording ignores the mode, restores nothing
    batches = [rng.standard_normal((4, 3, 8)).astype(np.float32) for _ in range(5)]
    before = net.bn1.state_dict()
    layers = {"first": net.bn1, "second": net.bn2} if explicit else None
    summary = normkit.recalibrate(net.forward, batches, layers=layers)
    (m1, v1), (m2, v2) = _expected_net_stats(net, batches)
    b1 = _population_bounds(batches, np.float32)
    K.assert_within(net.bn1.running_mean, m1, b1[0], "bn1 running_mean")
    K.assert_within(net.bn1.running_var, v1, b1[1], "bn1 running_var")
    # bn2 sees bn1's float32 output (within K.bound_normalized of the float64 one used
    # here), doubled by "* 2 + 1" (+ its float32 rounding): a perturbation delta of each
    # input moves the mean by <= max delta and the variance by <= 2 std max delta + delta^2
    delta = max(float(np.max(2 * K.bound_normalized(
        x, (0, 2), net.bn1.eps, net.bn1.weight[:, None], net.bn1.bias[:, None], np.float32)
        + 8 * 2.0 ** -24 * (2 * np.abs(_hand_bn1(net, x)) + 1))) for x in batches)
    b2 = _population_bounds(_expected_inputs2(net, batches), np.float32)
    K.assert_within(net.bn2.running_mean, m2, b2[0] + delta, "bn2 running_mean")
    K.assert_within(net.bn2.running_var, v2, b2[1] + (2 * np.sqrt(v2) * delta + delta ** 2)
                    * 32 * 5 / (32 * 5 - 1), "bn2 running_var")
    np.testing.assert_array_equal(net.bn1.weight, before["weight"])
    assert net.bn1.num_batches_tracked == 5
    assert not net.bn1.training and net.bn2.training
    assert summary == ({"first": 32 * 5, "second": 32 * 5} if explicit
                       else {"bn1": 32 * 5, "BatchNorm_1": 32 * 5})
    # the layers are back to normal: eval forward uses the new statistics
    x = batches[0]
    rstd = 1 / np.sqrt(v1[:, None] + 1e-5)
    xc = np.abs(x - m1[:, None])
    w = np.abs(net.bn1.weight[:, None])
    expected = (x - m1[:, None]) * rstd * net.bn1.weight[:, None] + net.bn1.bias[:, None]
    # eval pass in float32 (a few roundings: K.bound_elementwise) with statistics within
    # b1 of m1, v1: |w| rstd (d_mean + |x - m| d_var / (2 (var + eps)))
    bound = K.bound_elementwise(np.float32, w * rstd * xc, net.bn1.bias[:, None]) + w * rstd * (
        b1[0][:, None] + xc * b1[1][:, None] * rstd ** 2 / 2)
    K.assert_within(net.bn1(x), expected, bound, "eval forward with the new statistics")
    assert "_forward" not in vars(net.bn1)
    assert normkit.BatchNorm._forward is R._hook_original or R._hook_original is None


def test_callable_explicit_layers_leave_others_alone(rng):
    net = TinyNet()
    batches = [rng.standard_normal((4, 3, 8)) for _ in range(3)]
    normkit.recalibrate(net.forward, batches, layers=[net.bn2])
    # bn1 ran normally in training mode: an exponential average with momentum 0.1
    assert net.bn1.num_batches_tracked == 3
    (m1, _), _ = _expected_net_stats(net, batches)
    m_bound, _ = _population_bounds(batches, np.float32)
    assert np.abs(net.bn1.running_mean - m1).max() > 1e6 * m_bound.max()


def test_other_threads_are_not_recorded(rng):
    """The class-level hook only diverts calls of the recalibrating thread."""
    other = normkit.BatchNorm(3)
    x = rng.standard_normal((4, 3, 5))
    started, release = threading.Event(), threading.Event()
    results = {}

    def forward(batch):
        started.set()
        release.wait(5)
        return TinyNet().forward(batch)

    def run_other():
        started.wait(5)
        other(x)                                 # while the hook is installed
        results["tracked"] = other.num_batches_tracked
        release.set()

    t = threading.Thread(target=run_other)
    t.start()
    summary = normkit.recalibrate(forward, [x])
    t.join()
    assert results["tracked"] == 1               # ran the normal training forward
    assert len(summary) == 2


def test_failure_leaves_statistics_alone(rng):
    bn = normkit.BatchNorm(3)

    def batches():
        yield rng.standard_normal((4, 3))
        raise RuntimeError("data loader broke")

    with pytest.raises(RuntimeError, match="loader broke"):
        normkit.recalibrate(bn, batches())
    np.testing.assert_array_equal(bn.running_mean, 0)
    np.testing.assert_array_equal(bn.running_var, 1)
    net = TinyNet()
    with pytest.raises(ValueError):
        normkit.recalibrate(net.forward, [rng.standard_normal((4, 2, 5))])
    assert normkit.BatchNorm._forward is R._hook_original or R._hook_original is None
    assert R._hook_users == 0
    net.forward(rng.standard_normal((4, 3, 5)))  # works normally again


def test_errors(rng):
    with pytest.raises(TypeError, match="only BatchNorm"):
        normkit.recalibrate([normkit.LayerNorm(3)], [])
    with pytest.raises(ValueError, match="track_running_stats=False"):
        normkit.recalibrate(normkit.BatchNorm(3, track_running_stats=False), [])
    with pytest.raises(ValueError, match=r"expected 3 channels"):
        normkit.recalibrate(normkit.BatchNorm(3), [np.zeros((2, 4))])
    with pytest.raises(TypeError, match="each batch must be"):
        normkit.recalibrate([normkit.BatchNorm(3), normkit.BatchNorm(3)], [np.zeros((2, 3))])
    with pytest.raises(TypeError, match="a single BatchNorm takes plain arrays"):
        normkit.recalibrate([normkit.BatchNorm(3)], [np.zeros((2, 3))])
    one = normkit.BatchNorm(3)
    assert normkit.recalibrate([one], [[np.ones((2, 3))]]) == {0: 2}
    with pytest.raises(TypeError, match="layers= is only for a callable"):
        normkit.recalibrate(normkit.BatchNorm(3), [], layers=[normkit.BatchNorm(3)])
    with pytest.raises(ValueError, match="num_batches"):
        normkit.recalibrate(normkit.BatchNorm(3), [], num_batches=-1)
    bn = normkit.BatchNorm(3)
    with pytest.warns(RuntimeWarning, match="left as they were"):
        assert normkit.recalibrate(bn, []) == {0: 0}
    np.testing.assert_array_equal(bn.running_var, 1)


def test_progress_bar(rng, capsys):
    bn = normkit.BatchNorm(3)
    normkit.recalibrate(bn, [rng.standard_normal((2, 3))] * 4, progress=True)
    err = capsys.readouterr().err
    assert "recalibrate 4/4" in err and "100.0%" in err and err.endswith("\n")
    normkit.recalibrate(bn, (rng.standard_normal((2, 3)) for _ in range(3)), progress=True)
    assert "3 batches" in capsys.readouterr().err
    normkit.recalibrate(bn, [rng.standard_normal((2, 3))] * 4, progress=False)
    normkit.recalibrate(bn, [rng.standard_normal((2, 3))] * 4)   # not a tty: silent
    assert capsys.readouterr().err == ""


def test_progress_auto_waits_a_second():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    stream = Tty()
    bar = R._Progress(10, None, stream=stream)
    bar.update()
    assert stream.getvalue() == ""               # a short stream stays silent
    bar.start -= 2.0                             # pretend it has run for 2 s
    bar.last -= 2.0
    bar.update()
    bar.close()
    assert "2/10" in stream.getvalue() and stream.getvalue().endswith("\n")
