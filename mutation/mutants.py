"""The curated mutants: plausible one-line bugs a kernel or optimizer engineer makes.

Each replaces one exact line fragment (``old``, which must occur exactly once in ``path``) by
``new``. ``kind`` says what running it needs: ``python`` and ``triton`` (interpreted) mutants
only need the tests; ``cpp`` mutants rebuild the CPU extension; ``cuda`` mutants need a GPU
(a CUDA build and ``-m gpu``). ``tests`` are the test files run against the mutant (all of them
belong to the default suite, so a mutant they kill the default suite kills too).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mutant:
    """One one-line bug."""

    id: str
    path: str
    old: str
    new: str
    kind: str  # "python", "triton", "cpp" or "cuda"
    tests: tuple[str, ...]
    why: str


_OPS = ("tests/test_op_outputs.py", "tests/test_ops.py")
_OPT = ("tests/test_optimizer.py", "tests/test_faults.py", "tests/test_amp.py")
_NATIVE = ("tests/test_op_outputs.py", "tests/test_native.py", "tests/test_ops.py")
_GPU = ("tests/test_native.py", "tests/test_triton.py", "tests/test_amp.py")

MUTANTS: tuple[Mutant, ...] = (
    # --- C++ CPU kernels (kernels.inc is compiled into both builds) --------------------------
    Mutant("cpp-perturb-sign", "csrc/cpu/kernels.inc", "wv[k] = wv[k] + e;", "wv[k] = wv[k] - e;",
           "cpp", _NATIVE, "descent instead of ascent"),
    Mutant("cpp-asam-t-once", "csrc/cpu/kernels.inc", "e = e * t * t;", "e = e * t;",
           "cpp", _NATIVE, "ASAM scales by T(w) instead of T(w)^2"),
    Mutant("cpp-mask-ignored", "csrc/cpu/kernels.inc",
           "e = e * mask_lanes<Op>(mask.bits, first, std::min<int64_t>(V::size(), end - first));",
           "(void)first;", "cpp", _NATIVE, "sparse mask not applied"),
    Mutant("cpp-random-keep-flipped", "csrc/cpu/kernels.inc",
           "bits[j] = static_cast<Op>(h[j] < m.threshold);",
           "bits[j] = static_cast<Op>(h[j] >= m.threshold);",
           "cpp", (*_NATIVE, "tests/test_random_mask.py"),
           "the random mask keeps 1 - keep of the entries"),
    Mutant("cpp-random-salt-ignored", "csrc/cpu/sam_cpu.cpp",
           "mask.key = static_cast<uint32_t>(salts[c.tensor] ^ step_key);",
           "mask.key = static_cast<uint32_t>(step_key);", "cpp",
           (*_NATIVE, "tests/test_random_mask.py"), "every tensor draws the same random mask"),
    Mutant("cpp-norm-unsquared", "csrc/cpu/kernels.inc", "acc[k] = acc[k] + gd[k] * gd[k];",
           "acc[k] = acc[k] + gd[k];", "cpp", _NATIVE, "norm sums g, not g^2"),
    Mutant("cpp-portable-widen-lanes", "csrc/cpu/kernels.inc",
           "out[1] = Vectorized<double>::loadu(d + Vectorized<double>::size());",
           "out[1] = Vectorized<double>::loadu(d);", "cpp", _NATIVE,
           "portable build only: the norm reads the low lanes twice"),
    Mutant("cpp-sgd-scale-mul", "csrc/cpu/kernels.inc", "d[k] = d[k] / gs;", "d[k] = d[k] * gs;",
           "cpp", _NATIVE, "SGD multiplies by the AMP grad_scale"),
    Mutant("cpp-sgd-no-wd", "csrc/cpu/kernels.inc", "d[k] = d[k] + wd * wv[k];", "d[k] = d[k];",
           "cpp", _NATIVE, "SGD weight decay dropped"),
    Mutant("cpp-sgd-no-dampening", "csrc/cpu/kernels.inc", "mu * v[k] + damp * d[k]",
           "mu * v[k] + d[k]", "cpp", _NATIVE, "SGD dampening ignored"),
    Mutant("cpp-adam-scale-mul", "csrc/cpu/kernels.inc", "gv[k] = gv[k] / gs;",
           "gv[k] = gv[k] * gs;", "cpp", _NATIVE, "Adam multiplies by the AMP grad_scale"),
    Mutant("cpp-adam-no-bc2", "csrc/cpu/kernels.inc", "const V denom = second.sqrt() / bc2 + eps;",
           "const V denom = second.sqrt() + eps;", "cpp", _NATIVE,
           "Adam second-moment bias correction dropped"),
    Mutant("cpp-norm-eps-dropped", "csrc/cpu/sam_cpu.cpp",
           "const double scale = finite ? rho / (norm + eps) : 0.0;",
           "const double scale = finite ? rho / norm : 0.0;", "cpp", _NATIVE, "norm_eps ignored"),
    Mutant("cpp-skip-flag-ignored", "csrc/cpu/sam_cpu.cpp",
           "return flag.has_value() && flag->item<double>() != 0.0;", "return false;",
           "cpp", (*_NATIVE, "tests/test_amp.py"), "found_inf never skips the step"),
    # --- Triton kernels (run interpreted on the CPU) -----------------------------------------
    Mutant("triton-perturb-sign", "fused_sam/backends/triton/perturb.py",
           "new = to_storage(w + e, DTYPE)", "new = to_storage(w - e, DTYPE)", "triton", _OPS,
           "descent instead of ascent"),
    Mutant("triton-perturb-no-eps", "fused_sam/backends/triton/perturb.py",
           "scale = tl.where(finite, rho / (tl.sqrt(total) + eps), 0.0)",
           "scale = tl.where(finite, rho / tl.sqrt(total), 0.0)", "triton", _OPS,
           "norm_eps ignored"),
    Mutant("triton-sgd-scale-mul", "fused_sam/backends/triton/step.py",
           "inv = 1.0 / tl.load(grad_scale).to(tl.float64)",
           "inv = 1.0 * tl.load(grad_scale).to(tl.float64)", "triton", (*_OPS, "tests/test_amp.py"),
           "multiplies by the AMP grad_scale (SGD and Adam)"),
    Mutant("triton-sgd-maximize", "fused_sam/backends/triton/step.py",
           "        d = -d\n", "        d = d\n", "triton", _OPS, "SGD maximize ignored"),
    Mutant("triton-sgd-nesterov", "fused_sam/backends/triton/step.py",
           "            d = d + momentum * v\n", "            d = v\n", "triton", _OPS,
           "SGD nesterov ignored"),
    Mutant("triton-adam-no-decoupled-wd", "fused_sam/backends/triton/step.py",
           "            w = w * decay\n", "            w = w\n", "triton", _OPS,
           "AdamW decoupled weight decay dropped"),
    Mutant("triton-random-chunk-offset", "fused_sam/backends/triton/perturb.py",
           "new = tl.where(element_hash(key, first + offs) < threshold, new, w_raw)",
           "new = tl.where(element_hash(key, offs) < threshold, new, w_raw)", "triton",
           (*_OPS, "tests/test_random_mask.py"), "every chunk of a tensor repeats one mask"),
    Mutant("triton-norm-unsquared", "fused_sam/backends/triton/norm.py",
           "tl.store(out + pid, tl.sum(acc, axis=0))",
           "tl.store(out + pid, tl.sum(tl.sqrt(acc), axis=0))",
           "triton", _OPS, "partials of the norm, not of its square"),
    # --- Python: foreach backend, oracle, optimizer, masks -----------------------------------
    Mutant("foreach-scale-dropped", "fused_sam/backends/foreach.py",
           "        torch._foreach_add_(params, grads, alpha=scale)\n",
           "        torch._foreach_add_(params, grads)\n", "python", _OPS,
           "e = g, not rho g/||g||"),
    Mutant("reference-norm-eps-dropped", "fused_sam/reference.py",
           "scale = rho / (norm + eps) if finite else 0.0", "scale = rho / norm if finite else 0.0",
           "python", (*_OPS, "tests/test_optimizer.py"), "the oracle drops norm_eps"),
    Mutant("reference-sgd-dampening", "fused_sam/reference.py",
           "v = d if first_step else momentum * buf.double() + (1 - dampening) * d",
           "v = d if first_step else momentum * buf.double() + d", "python",
           ("tests/test_reference.py",), "the oracle ignores dampening"),
    Mutant("optimizer-maximize-sign", "fused_sam/optimizer.py",
           'sign = -1.0 if group.get("maximize", False) else 1.0', "sign = 1.0", "python", _OPT,
           "maximize does not flip the ascent"),
    Mutant("optimizer-skip-nonfinite-ignored", "fused_sam/optimizer.py",
           "check = self.skip_nonfinite and scaler_inf is None", "check = scaler_inf is None",
           "python", ("tests/test_op_outputs.py", *_OPT), "skip_nonfinite=False ignored"),
    Mutant("optimizer-weights-mode-all", "fused_sam/optimizer.py",
           "adaptive += [p.dim() >= 2 for p in ps]", "adaptive += [True for p in ps]", "python",
           _OPT, 'adaptive="weights" scales biases too'),
    Mutant("optimizer-plan-key-no-rho", "fused_sam/optimizer.py",
           "key = (tuple(map(id, params)), layout, tuple(rho), tuple(adaptive), tuple(eta))",
           "key = (tuple(map(id, params)), layout, tuple(adaptive), tuple(eta))", "python", _OPT,
           "a cached plan survives a rho change"),
    Mutant("optimizer-scaler-unscale-ignored", "fused_sam/optimizer.py",
           'grad_scale: Tensor | None = getattr(self, "grad_scale", None)',
           "grad_scale: Tensor | None = None", "python", ("tests/test_amp.py",),
           "GradScaler's grad_scale ignored"),
    Mutant("optimizer-pass1-flag-dropped", "fused_sam/optimizer.py",
           "found_inf = _either(st.found_inf, scaler_inf)", "found_inf = scaler_inf", "python",
           _OPT, "a non-finite first pass does not skip the base step"),
    Mutant("optimizer-skip-creates-state", "fused_sam/optimizer.py",
           "if not bool(found_inf.item()):", "if True:", "python", _OPT,
           "a skipped first step creates optimizer state"),
    Mutant("foreach-random-scale-dropped", "fused_sam/backends/foreach.py",
           "return [random_mask(masks, i, w) for i, w in enumerate(params)], rho * masks.scale",
           "return [random_mask(masks, i, w) for i, w in enumerate(params)], rho", "python",
           (*_OPS, "tests/test_random_mask.py"), "ESAM's 1 / keep rescaling dropped"),
    Mutant("optimizer-random-same-draw", "fused_sam/optimizer.py",
           "                self._random.draws += 1\n", "                pass\n", "python",
           ("tests/test_random_mask.py",), "every step draws the same random mask"),
    Mutant("masks-random-hash-shift", "fused_sam/masks.py",
           "    x = x ^ (x >> 13)\n", "    x = x ^ (x >> 12)\n", "python",
           ("tests/test_random_mask.py",), "the reference hash is not the kernels' hash"),
    Mutant("masks-new-param-all-ones", "fused_sam/masks.py",
           "m = torch.zeros(packed_numel(p.numel()), dtype=torch.uint8, device=p.device)",
           "m = torch.full((packed_numel(p.numel()),), 255, dtype=torch.uint8, device=p.device)",
           "python", ("tests/test_ssam.py",), "a parameter added after a refresh is all ones"),
    Mutant("looksam-no-reuse", "fused_sam/variants/looksam.py",
           "scale = torch.where(nv > 0, self.alpha * ng / nv, torch.zeros_like(nv))",
           "scale = torch.zeros_like(nv)", "python", ("tests/test_variants.py",),
           "LookSAM's reuse steps drop the g_v correction (EveryK)"),
    Mutant("looksam-no-projection", "fused_sam/variants/looksam.py",
           "coef = torch.where(n2 > 0, dot(gs, g1) / n2, torch.zeros_like(n2))",
           "coef = torch.zeros_like(n2)", "python", ("tests/test_variants.py",),
           "LookSAM keeps g_s instead of its part orthogonal to g"),
    Mutant("friendly-sam-no-average", "fused_sam/variants/friendly_sam.py",
           "            g.sub_(m * self.sigma)\n", "            pass\n", "python",
           ("tests/test_variants.py",), "F-SAM perturbs along g, not g - sigma m"),
    Mutant("friendly-sam-average-order", "fused_sam/variants/friendly_sam.py",
           "new = old * self.lam + g * (1 - self.lam)",
           "new = g * self.lam + old * (1 - self.lam)", "python",
           ("tests/test_variants.py",), "F-SAM's moving average weights swapped"),
    Mutant("gsam-no-radius-schedule", "fused_sam/variants/gsam.py",
           "return self.rho_min + (rho - self.rho_min) * frac", "return rho", "python",
           ("tests/test_variants.py",), "GSAM's radius does not follow the learning rate"),
    Mutant("gsam-perp-sign", "fused_sam/variants/gsam.py",
           "g.copy_((g.double() - self.alpha * perp).to(g.dtype))",
           "g.copy_((g.double() + self.alpha * perp).to(g.dtype))", "python",
           ("tests/test_variants.py",), "GSAM adds the orthogonal component"),
    Mutant("momentum-sam-sign", "fused_sam/variants/momentum_sam.py",
           "[-self.rho] * n", "[self.rho] * n", "python",
           ("tests/test_variants.py",), "Momentum-SAM perturbs along +v"),
    Mutant("momentum-sam-no-restore", "fused_sam/variants/momentum_sam.py",
           "F.restore_(ps, [self._w[p] for p in ps], self.backend)",
           "pass", "python",
           ("tests/test_variants.py",), "Momentum-SAM steps from the perturbed weights"),
    # --- CUDA kernels (need a GPU: CUDA build + ``-m gpu``) -----------------------------------
    Mutant("cuda-perturb-sign", "csrc/cuda/sam_kernels.cu",
           "wp.v[j] = Num<T>::from_op(wj + e);", "wp.v[j] = Num<T>::from_op(wj - e);", "cuda",
           _GPU, "descent instead of ascent"),
    Mutant("cuda-sgd-scale-mul", "csrc/cuda/sam_kernels.cu", "d = d / gs;", "d = d * gs;", "cuda",
           _GPU, "SGD multiplies by the AMP grad_scale"),
    Mutant("cuda-norm-unsquared", "csrc/cuda/sam_kernels.cu", "total = total + x * x;",
           "total = total + x;", "cuda", _GPU, "norm sums g, not g^2"),
    Mutant("cuda-random-salt-ignored", "csrc/cuda/sam_kernels.cu",
           "? static_cast<uint32_t>(tab.value(kPMask, c.tensor)) ^ random.step_key",
           "? random.step_key", "cuda", _GPU, "every tensor draws the same random mask"),
    Mutant("cuda-sgd-nesterov", "csrc/cuda/sam_kernels.cu", "d = a.nesterov ? d + mu * v : v;",
           "d = v;", "cuda", _GPU, "SGD nesterov ignored"),
)  # fmt: skip
