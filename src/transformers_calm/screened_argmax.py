"""The decoder's argmax over the vocabulary on CPU: a bfloat16 screen, then float32 scores for the few tokens that can
win.

CALM turns a latent vector into tokens by an argmax of the decoder's scores over the vocabulary, never a softmax, and
at a temperature below 1 it decodes N = 200 candidates per chunk (the paper's batch approximation), so on CPU most of
a decoding step is this product (`(rows, hidden) x (hidden, vocab)`). On CPUs with bfloat16 dot-product instructions
(AVX512-BF16 or AMX) a bfloat16 product runs 3-5x faster than the float32 one; only the argmax is wanted, and it
does not need every score exactly, only the best few:

1. bfloat16 scores of every token, and the `top_k` best of each row;
2. a bound E on the error of every bfloat16 score (below), so that no token whose bfloat16 score is below
   `best - 2E` (and a little more for the rounding of the scores themselves) can be the argmax;
3. where the k-th best bfloat16 score is below that floor, the winner is among the k: their float32 scores decide
   it (ties: the smallest token id, as `torch.argmax`). Rows where this cannot be shown (more than k tokens within
   the error of the best, non-finite values) take the full float32 product.

The result is the argmax of the float32 scores; two tokens whose scores differ by less than float32 rounding may be
ordered either way (as by the float32 product itself, whose order of summation depends on the matrix shapes).

The error bound. With h = h' + dh and w = w' + dw (h', w' the bfloat16 roundings; dh, dw exact in float32),
h.w = h'.w' + h'.dw + dh.w, so |h.w - h'.w'| <= |h'| max|dw| + |dh| max|w| (Cauchy-Schwarz, maxima over the
vocabulary). The product h'.w' is summed in float32 (exact products of bfloat16 numbers, at most d-fold rounding:
gamma_d |h'| |w'|), then rounded to bfloat16 (relative 2^-8). The float32 scores that decide have their own rounding
(gamma_d |h| |w|), which the floor also covers, so that a token the float32 product would pick is never screened out.
"""

import functools

import torch

BF16_UNIT_ROUNDOFF = 2.0**-8
FP32_UNIT_ROUNDOFF = 2.0**-24


@functools.cache
def bf16_matmul_is_fast() -> bool:
    """Whether this CPU has bfloat16 dot-product instructions (torch's own checks; private, so absent means no)."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


class ScreenedArgmax:
    """`(states @ weight.T).argmax(-1)` for float32 CPU tensors, through a bfloat16 screen (see the module's
    docstring). Keeps a bfloat16 copy of `weight` (and two norms) between calls, rebuilt when the weight changes: its
    storage, an in-place update (an optimiser step, `load_state_dict`: the tensor's version counter), or different
    values at 257 entries spread over it. Writes through `weight.data` bypass the version counter, so after changing
    a few entries that way, call [`reset`]. The copy is not pickled or deep-copied.

    Args:
        top_k (`int`, *optional*, defaults to 16):
            Tokens per row whose float32 scores are computed. A row whose winner is not provably among them gets a
            second look at 16x as many, then the full float32 product; 16 leaves no such row in >99.9% of rows of
            random 512-wide decoders (32k and 128k vocabularies, measured).
    """

    _PROBES = 257  # entries of the weight compared at each call (see above)
    _SECOND_LOOK_ROWS = 64  # more rows left than this go straight to the float32 product (bounded memory)

    def __init__(self, top_k: int = 16):
        self.top_k = top_k
        self.reset()

    def reset(self) -> None:
        """Forget the bfloat16 copy of the weight (it is rebuilt at the next call)."""
        self._key = None
        self._probe = None
        self._weight_bf16 = None
        self._max_norm = None  # max over the vocabulary of |w|
        self._max_rounding = None  # max over the vocabulary of |w - bf16(w)|

    def __getstate__(self):
        return {"top_k": self.top_k}

    def __setstate__(self, state):
        self.__init__(**state)

    def applies(self, states: torch.Tensor, weight: torch.Tensor) -> bool:
        """True where the screen is exact and pays: float32 states and weight on a CPU with bfloat16 instructions,
        full float32 matrix products (no autocast, `torch.get_float32_matmul_precision() == "highest"`), a
        vocabulary larger than `top_k`, outside torch.compile (the row-wise fallback is data-dependent; compiled
        graphs keep the plain product)."""
        return (
            not torch.compiler.is_compiling()
            and states.device.type == weight.device.type == "cpu"
            and states.dtype == weight.dtype == torch.float32
            and weight.shape[0] > self.top_k
            and not torch.is_autocast_enabled("cpu")
            and torch.get_float32_matmul_precision() == "highest"
            and bf16_matmul_is_fast()
        )

    def _prepared(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        weight = weight.detach()
        # Inference tensors (made under torch.inference_mode) have no version counter; the probe still applies.
        version = None if weight.is_inference() else weight._version
        key = (weight.data_ptr(), version, tuple(weight.shape), weight.device)
        flat = weight.reshape(-1)
        # Integer positions: a float32 linspace rounds indices past 2^24 (a 128k x 512 weight) out of range.
        probe = flat[torch.arange(self._PROBES, device=flat.device) * (flat.numel() - 1) // (self._PROBES - 1)]
        if key != self._key or not torch.equal(probe, self._probe):
            self._weight_bf16 = weight.to(torch.bfloat16)
            self._max_norm = weight.norm(dim=-1).max()
            self._max_rounding = (weight - self._weight_bf16.float()).norm(dim=-1).max()
            self._key, self._probe = key, probe
        return self._weight_bf16, self._max_norm, self._max_rounding

    @torch.no_grad()
    def __call__(self, states: torch.Tensor, weight: torch.Tensor) -> torch.LongTensor:
        """Token ids `(rows,)`: the argmax over `weight`'s rows `(vocab, d)` of `states @ weight.T`, `states`
        `(rows, d)`."""
        weight_bf16, max_norm, max_rounding = self._prepared(weight)
        states, weight = states.detach(), weight.detach()
        states_bf16 = states.to(torch.bfloat16)
        scores = states_bf16 @ weight_bf16.T
        error, reference_error = self._errors(states, states_bf16, max_norm, max_rounding)
        floor = 2 * (error + reference_error)
        token_ids, provable = self._decide(states, weight, scores, floor, self.top_k)
        if not bool(provable.all()):
            rows = (~provable).nonzero().squeeze(1)
            if len(rows) <= self._SECOND_LOOK_ROWS:
                # A second look at the rows left, 16x as many tokens, from the same bf16 scores.
                k = min(16 * self.top_k, weight.shape[0])
                token_ids[rows], provable_now = self._decide(states[rows], weight, scores[rows], floor[rows], k)
                rows = rows[~provable_now]
            if len(rows):
                token_ids[rows] = (states[rows] @ weight.T).argmax(-1)
        return token_ids

    @staticmethod
    def _errors(states, states_bf16, max_norm, max_rounding) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row `(rows,)`: the bound on |bf16 score before its final rounding - exact score| over the vocabulary,
        and on |float32 score - exact score| (see the module's docstring)."""
        d = states.shape[-1]
        gamma = d * FP32_UNIT_ROUNDOFF / (1 - d * FP32_UNIT_ROUNDOFF)
        states_rounded = states_bf16.float()
        norm = states.norm(dim=-1)
        error = states_rounded.norm(dim=-1) * max_rounding + (states - states_rounded).norm(dim=-1) * max_norm
        error = (error + gamma * norm * max_norm * (1 + BF16_UNIT_ROUNDOFF) ** 2) * 1.01  # 1%: rounding of the norms
        return error, gamma * norm * max_norm * 1.01

    @staticmethod
    def _decide(states, weight, scores, floor, k) -> tuple[torch.LongTensor, torch.BoolTensor]:
        """The winner of each row among its k best bf16 `scores` by float32 scores, and whether the row's winner is
        provably among them (False for non-finite values). `floor`: how far below the best bf16 score (before the
        rounding of either) a token's can be and that token still be the float32 product's choice."""
        u = BF16_UNIT_ROUNDOFF / (1 - BF16_UNIT_ROUNDOFF)  # |x - bf16(x)| <= u |bf16(x)|
        top, candidates = scores.topk(k, dim=-1)
        top = top.float()
        best = top[:, 0]
        # The least (unrounded) bf16 score a possible winner has; 4 float32 ulps for the rounding of this line.
        lowest = best - (u + 4 * FP32_UNIT_ROUNDOFF) * best.abs() - floor
        provable = top[:, -1] < lowest - u * lowest.abs()  # ... and rounded: every possible winner is among the k
        exact = torch.bmm(weight[candidates], states.unsqueeze(-1)).squeeze(-1)  # (rows, k) float32 scores
        winners = exact == exact.amax(-1, keepdim=True)
        return torch.where(winners, candidates, weight.shape[0]).amin(-1), provable


__all__ = ["ScreenedArgmax", "bf16_matmul_is_fast"]
