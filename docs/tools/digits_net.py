"""A tiny convolutional network in NumPy whose normalization layers are normkit's.

Used by ``make_figures.py`` for the accuracy-vs-batch-size and train/eval-gap figures.
Everything except normalization (3x3 convolutions, ReLU, global average pooling, the
linear classifier, softmax cross-entropy and their gradients) is written here by hand;
every normalization forward *and* backward is a call to a normkit layer
(``BatchNorm``, ``GroupNorm``, ``LayerNorm``), so the experiment exercises the
library the way a user's training loop would.

Architecture (input: scikit-learn's 8x8 digits, one channel, scaled to [0, 1])::

    conv3x3(1->16)        -> norm -> ReLU      16 x 8 x 8
    conv3x3(16->32, s=2)  -> norm -> ReLU      32 x 4 x 4
    conv3x3(32->32)       -> norm -> ReLU      32 x 4 x 4
    global average pool -> linear(32->10) -> softmax cross-entropy

``norm`` is one of ``"batch"`` (``BatchNorm(C)``), ``"group"`` (``GroupNorm(4, C)``),
``"layer"`` (``LayerNorm((C, H, W))``, torch's LayerNorm over a whole feature map,
with per-element affine parameters) or ``"none"``.
"""
from __future__ import annotations

import warnings

import numpy as np

import normkit

NORMS = ("batch", "group", "layer", "none")
GROUPS = 4
# (in channels, out channels, stride); input is 8x8
CONVS = ((1, 16, 1), (16, 32, 2), (32, 32, 1))


def make_norm(kind, c, h, w):
    if kind == "batch":
        return normkit.BatchNorm(c)
    if kind == "group":
        return normkit.GroupNorm(GROUPS, c)
    if kind == "layer":
        return normkit.LayerNorm((c, h, w))
    if kind == "none":
        return None
    raise ValueError(f"unknown norm {kind!r}; expected one of {NORMS}")


class Conv3x3:
    """3x3 convolution with padding 1 (im2col + one matrix product), float32."""

    def __init__(self, cin, cout, stride, rng):
        fan_in = cin * 9
        self.w = (rng.standard_normal((fan_in, cout)) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        self.b = np.zeros(cout, np.float32)
        self.stride = stride

    def forward(self, x):
        n, c, h, w = x.shape
        s = self.stride
        xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
        win = np.lib.stride_tricks.sliding_window_view(xp, (3, 3), axis=(2, 3))[:, :, ::s, ::s]
        ho, wo = win.shape[2], win.shape[3]
        cols = win.transpose(0, 2, 3, 1, 4, 5).reshape(n * ho * wo, c * 9)
        self.cache = (x.shape, cols, ho, wo)
        y = cols @ self.w + self.b
        return np.ascontiguousarray(y.reshape(n, ho, wo, -1).transpose(0, 3, 1, 2))

    def backward(self, dy):
        (n, c, h, w), cols, ho, wo = self.cache
        s = self.stride
        dy2 = dy.transpose(0, 2, 3, 1).reshape(n * ho * wo, -1)
        self.dw = cols.T @ dy2
        self.db = dy2.sum(axis=0)
        dcols = (dy2 @ self.w.T).reshape(n, ho, wo, c, 3, 3)
        dxp = np.zeros((n, c, h + 2, w + 2), np.float32)
        for i in range(3):
            for j in range(3):
                dxp[:, :, i:i + s * ho:s, j:j + s * wo:s] += dcols[..., i, j].transpose(0, 3, 1, 2)
        return dxp[:, :, 1:-1, 1:-1]

    def step(self, lr):
        self.w -= lr * self.dw
        self.b -= lr * self.db


class Net:
    def __init__(self, norm, rng):
        self.convs, self.norms = [], []
        size = 8
        for cin, cout, stride in CONVS:
            self.convs.append(Conv3x3(cin, cout, stride, rng))
            size = (size - 1) // stride + 1
            self.norms.append(make_norm(norm, cout, size, size))
        c = CONVS[-1][1]
        self.fc_w = (rng.standard_normal((c, 10)) * np.sqrt(1.0 / c)).astype(np.float32)
        self.fc_b = np.zeros(10, np.float32)

    def train(self, mode=True):
        for norm in self.norms:
            if norm is not None:
                norm.train(mode)
        return self

    def eval(self):
        return self.train(False)

    def forward(self, x):
        self.masks = []
        for conv, norm in zip(self.convs, self.norms):
            x = conv.forward(x)
            if norm is not None:
                x = norm(x)
            mask = x > 0
            self.masks.append(mask)
            x = x * mask
        self.pool_shape = x.shape
        self.pooled = x.mean(axis=(2, 3))
        return self.pooled @ self.fc_w + self.fc_b

    def norm_input(self, x, k):
        """The input of the k-th normalization layer (eval mode, nothing cached)."""
        for conv, norm in zip(self.convs[:k + 1], self.norms[:k + 1]):
            x = conv.forward(x)
            if conv is self.convs[k]:
                return x
            if norm is not None:
                norm.eval()
                x = norm(x)
            x = x * (x > 0)
        raise IndexError(k)

    def backward(self, dlogits):
        self.d_fc_w = self.pooled.T @ dlogits
        self.d_fc_b = dlogits.sum(axis=0)
        dpooled = dlogits @ self.fc_w.T
        n, c, h, w = self.pool_shape
        dx = np.broadcast_to((dpooled / (h * w))[:, :, None, None], self.pool_shape)
        for conv, norm, mask in zip(self.convs[::-1], self.norms[::-1], self.masks[::-1]):
            dx = dx * mask
            if norm is not None:
                dx = norm.backward(dx)
            dx = conv.backward(dx)

    def step(self, lr):
        self.fc_w -= lr * self.d_fc_w
        self.fc_b -= lr * self.d_fc_b
        for conv, norm in zip(self.convs, self.norms):
            conv.step(lr)
            if norm is not None:
                params = norm.parameters()
                for name, g in norm.grads.items():
                    params[name] -= lr * g          # live arrays: updated in place

    def state(self):
        """Copies of the normalization layers' state (to undo running-stat updates)."""
        return [None if n is None else n.state_dict() for n in self.norms]

    def load_state(self, state):
        for norm, s in zip(self.norms, state):
            if norm is not None:
                norm.load_state_dict(s)


def softmax_ce(logits, labels):
    """Mean cross-entropy and its gradient with respect to the logits."""
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    n = len(labels)
    loss = -np.log(p[np.arange(n), labels] + 1e-12).mean()
    p[np.arange(n), labels] -= 1.0
    return float(loss), (p / n).astype(np.float32)


def load_digits(split_seed=0, test_fraction=0.2):
    """scikit-learn's bundled 8x8 digits (no download): (x_train, y_train, x_test, y_test)."""
    from sklearn.datasets import load_digits as _load
    from sklearn.model_selection import train_test_split

    data = _load()
    x = (data.images / 16.0).astype(np.float32)[:, None]     # (1797, 1, 8, 8), in [0, 1]
    return tuple(train_test_split(x, data.target, test_size=test_fraction,
                                  random_state=split_seed, stratify=data.target))


def train(norm, batch_size, seed, data, *, epochs, base_lr, ref_batch=32):
    """Train one network with plain SGD (linear learning-rate scaling, Goyal et al.).

    Returns a dict of results: eval-mode test accuracy, train-mode test accuracy
    (test batches of the training batch size, batch statistics), the gap between
    the two modes' logits, and how many ``UnstableBatchStatisticsWarning`` the
    training raised (recorded, not shown; they are rate-limited per layer and cause).
    """
    x_tr, x_te, y_tr, y_te = data
    net, lr, losses, n_warnings = train_net(norm, batch_size, seed, x_tr, y_tr,
                                            epochs=epochs, base_lr=base_lr,
                                            ref_batch=ref_batch)
    return _evaluate(net, norm, batch_size, seed, epochs, lr, losses, n_warnings,
                     x_te, y_te)


def train_net(norm, batch_size, seed, x_tr, y_tr, *, epochs, base_lr, ref_batch=32):
    """The training loop of :func:`train`: returns (net, lr, epoch losses, warnings)."""
    rng = np.random.default_rng(seed)
    net = Net(norm, rng)
    lr = base_lr * batch_size / ref_batch
    losses = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", normkit.UnstableBatchStatisticsWarning)
        _epochs(net, x_tr, y_tr, rng, batch_size, epochs, lr, losses)
    unstable = [w for w in caught
                if issubclass(w.category, normkit.UnstableBatchStatisticsWarning)]
    for w in caught:                        # anything else is passed on as usual
        if w not in unstable:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return net, lr, losses, len(unstable)


def _epochs(net, x_tr, y_tr, rng, batch_size, epochs, lr, losses):
    n = len(x_tr)
    for _ in range(epochs):
        order = rng.permutation(n)
        epoch_loss = 0.0
        steps = n // batch_size                     # drop the last partial batch
        for k in range(steps):
            idx = order[k * batch_size:(k + 1) * batch_size]
            logits = net.forward(x_tr[idx])
            loss, dlogits = softmax_ce(logits, y_tr[idx])
            if not np.isfinite(loss):
                break
            net.backward(dlogits)
            net.step(lr)
            epoch_loss += loss
        losses.append(epoch_loss / max(steps, 1))


def _evaluate(net, norm, batch_size, seed, epochs, lr, losses, n_warnings, x_te, y_te):
    net.eval()
    logits_eval = net.forward(x_te)
    acc_eval = float((logits_eval.argmax(1) == y_te).mean())
    # Training mode on the test set, in batches of the training batch size; the
    # running statistics this updates are restored afterwards.
    saved = net.state()
    net.train()
    m = (len(x_te) // batch_size) * batch_size
    with warnings.catch_warnings():         # counted during training, not here
        warnings.simplefilter("ignore", normkit.UnstableBatchStatisticsWarning)
        logits_train = np.concatenate([net.forward(x_te[k:k + batch_size])
                                       for k in range(0, m, batch_size)])
    net.load_state(saved)
    le = logits_eval[:m]
    gap = float(np.linalg.norm(logits_train - le) / max(np.linalg.norm(le), 1e-12))
    return {
        "norm": norm, "batch_size": batch_size, "seed": seed, "epochs": epochs,
        "lr": lr, "final_train_loss": losses[-1] if losses else float("nan"),
        "test_acc_eval": acc_eval,
        "test_acc_train_mode": float((logits_train.argmax(1) == y_te[:m]).mean()),
        "eval_train_disagreement": float((logits_train.argmax(1) != le.argmax(1)).mean()),
        "logit_gap": gap,
        "unstable_batch_warnings": n_warnings,
    }
