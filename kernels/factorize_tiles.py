"""Tile table of the factorization kernels: ONE entry per (dtype, r bucket, D bucket).

Read by `factorize_triton._plan` (validated there: powers of two, limits), rewritten by
`python benchmarks/bench_factorization.py tune --write` on a GPU, which marks the entries it
measured with the device in a comment. Entries without such a comment were chosen by reasoning
and checked only by the compile report (`python benchmarks/kernel_report.py`: registers, spills,
waves for sm_90), not timed.

Keys: the dtype the dots compute in ("bfloat16", "float16", "float32-tf32": fp32 inputs with
torch.backends.cuda.matmul.allow_tf32 on, "float32": IEEE fp32); r bucket = BLOCK_R = max(16, next power of two of r), one of R_BUCKETS; D bucket
= the first bound in D_BUCKETS that max(D, Dv) does not exceed (None: wider).
Values: kernel -> (BLOCK_N, BLOCK_C, num_warps, num_stages)
    fwd     forward, row-tiled: BLOCK_N patches per program, BLOCK_C columns of D / Dv per step
    rows    backward dL = dZ V^T and the softmax backward, row-tiled like fwd
    dense   backward d_dense and the keys' gradient, column-tiled: BLOCK_C columns of D per
            program, BLOCK_N patches per step of its loop over N
    values  backward dV = L^T dZ, column-tiled like dense over Dv
MIX: per 16-bit dtype, how a dot of an fp32 intermediate (L, dlogits) with an input tile runs on
the GPU: "input" (the intermediate rounded to the input dtype: 16-bit tensor cores), "tf32"
(one TF32 pass), "tf32x3" (three TF32 passes, near fp32) or "ieee" (FMA). A policy, not a tile:
`tune` prints each option's time and error for a person to choose; it never changes it.
"""

R_BUCKETS = (16, 32, 64, 128)
D_BUCKETS = (512, 1024, None)

MIX = {'bfloat16': 'tf32', 'float16': 'input'}

TILES = {
    ('bfloat16', 16, 512): {'fwd': (64, 64, 4, 3), 'rows': (64, 64, 4, 3), 'dense': (64, 64, 4, 3), 'values': (64, 64, 4, 3)},
    ('bfloat16', 16, 1024): {'fwd': (64, 64, 4, 3), 'rows': (64, 64, 4, 3), 'dense': (64, 64, 4, 3), 'values': (64, 64, 4, 3)},
    ('bfloat16', 16, None): {'fwd': (64, 64, 4, 3), 'rows': (64, 64, 4, 3), 'dense': (64, 64, 4, 3), 'values': (64, 64, 4, 3)},
    ('bfloat16', 32, 512): {'fwd': (64, 64, 4, 3), 'rows': (64, 64, 4, 3), 'dense': (64, 64, 4, 3), 'values': (64, 64, 4, 3)},
    ('bfloat16', 32, 1024): {'fwd': (64, 64, 4, 3), 'rows': (64, 64, 4, 3), 'dense': (64, 64, 4, 3), 'values': (64, 64, 4, 3)},
    ('bfloat16', 32, None): {'fwd': (64, 64, 4, 3), 'rows': (64, 64, 4, 3), 'dense': (64, 64, 4, 3), 'values': (64, 64, 4, 3)},
    ('bfloat16', 64, 512): {'fwd': (64, 64, 4, 3), 'rows': (64, 64, 4, 3), 'dense': (64, 64, 4, 3), 'values': (64, 64, 4, 3)},
    ('bfloat16', 64, 1024): {'fwd': (64, 64, 4, 3), 'rows': (64, 64, 4, 3), 'dense': (64, 64, 4, 3), 'values': (64, 64, 4, 3)},
    ('bfloat16', 64, None): {'fwd': (64, 64, 4, 3), 'rows': (64, 64, 4, 3), 'dense': (64, 64, 4, 3), 'values': (64, 64, 4, 3)},
    ('bfloat16', 128, 512): {'fwd': (64, 64, 8, 3), 'rows': (64, 64, 8, 3), 'dense': (64, 64, 8, 3), 'values': (64, 64, 8, 3)},
    ('bfloat16', 128, 1024): {'fwd': (64, 64, 8, 3), 'rows': (64, 64, 8, 3), 'dense': (64, 64, 8, 3), 'values': (64, 64, 8, 3)},
    ('bfloat16', 128, None): {'fwd': (64, 64, 8, 3), 'rows': (64, 64, 8, 3), 'dense': (64, 64, 8, 3), 'values': (64, 64, 8, 3)},
    ('float16', 16, 512): {'fwd': (64, 64, 4, 3), 'rows': (64, 64, 4, 3), 'dense': (64, 64, 4, 3), 'values': (64, 64, 4, 3)},
    ('float16', 16, 1024): {'fwd': (64, 64, 4, 3), 'rows': (64, 64, 4, 3), 'dense': (64, 64, 4, 3), 'values': (64, 64, 4, 3)},
    ('float16', 16, None): {'fwd': (64, 64, 4, 3), 'rows': (64, 64, 4, 3), 'dense': (64, 64, 4, 3), 'values': (64, 64, 4, 3)},
    ('float16', 32, 512): {'fwd': (64, 64, 4, 3), 'rows': (64, 64, 4, 3), 'dense': (64, 64, 4, 3), 'values': (64, 64, 4, 3)},
    ('float16', 32, 1024): {'fwd': (64, 64, 4, 3), 'rows': (64, 64, 4, 3), 'dense': (64, 64, 4, 3), 'values': (64, 64, 4, 3)},
    ('float16', 32, None): {'fwd': (64, 64, 4, 3), 'rows': (64, 64, 4, 3), 'dense': (64, 64, 4, 3), 'values': (64, 64, 4, 3)},
    ('float16', 64, 512): {'fwd': (64, 64, 4, 3), 'rows': (64, 64, 4, 3), 'dense': (64, 64, 4, 3), 'values': (64, 64, 4, 3)},
    ('float16', 64, 1024): {'fwd': (64, 64, 4, 3), 'rows': (64, 64, 4, 3), 'dense': (64, 64, 4, 3), 'values': (64, 64, 4, 3)},
    ('float16', 64, None): {'fwd': (64, 64, 4, 3), 'rows': (64, 64, 4, 3), 'dense': (64, 64, 4, 3), 'values': (64, 64, 4, 3)},
    ('float16', 128, 512): {'fwd': (64, 64, 8, 3), 'rows': (64, 64, 8, 3), 'dense': (64, 64, 8, 3), 'values': (64, 64, 8, 3)},
    ('float16', 128, 1024): {'fwd': (64, 64, 8, 3), 'rows': (64, 64, 8, 3), 'dense': (64, 64, 8, 3), 'values': (64, 64, 8, 3)},
    ('float16', 128, None): {'fwd': (64, 64, 8, 3), 'rows': (64, 64, 8, 3), 'dense': (64, 64, 8, 3), 'values': (64, 64, 8, 3)},
    ('float32-tf32', 16, 512): {'fwd': (64, 64, 4, 3), 'rows': (64, 64, 4, 3), 'dense': (64, 64, 4, 3), 'values': (64, 64, 4, 3)},
    ('float32-tf32', 16, 1024): {'fwd': (64, 64, 4, 3), 'rows': (64, 64, 4, 3), 'dense': (64, 64, 4, 3), 'values': (64, 64, 4, 3)},
    ('float32-tf32', 16, None): {'fwd': (64, 64, 4, 3), 'rows': (64, 64, 4, 3), 'dense': (64, 64, 4, 3), 'values': (64, 64, 4, 3)},
    ('float32-tf32', 32, 512): {'fwd': (64, 64, 4, 3), 'rows': (64, 64, 4, 3), 'dense': (64, 64, 4, 3), 'values': (64, 64, 4, 3)},
    ('float32-tf32', 32, 1024): {'fwd': (64, 64, 4, 3), 'rows': (64, 64, 4, 3), 'dense': (64, 64, 4, 3), 'values': (64, 64, 4, 3)},
    ('float32-tf32', 32, None): {'fwd': (64, 64, 4, 3), 'rows': (64, 64, 4, 3), 'dense': (64, 64, 4, 3), 'values': (64, 64, 4, 3)},
    ('float32-tf32', 64, 512): {'fwd': (64, 64, 4, 3), 'rows': (64, 64, 4, 3), 'dense': (64, 64, 4, 3), 'values': (64, 64, 4, 3)},
    ('float32-tf32', 64, 1024): {'fwd': (64, 64, 4, 3), 'rows': (64, 64, 4, 3), 'dense': (64, 64, 4, 3), 'values': (64, 64, 4, 3)},
    ('float32-tf32', 64, None): {'fwd': (64, 64, 4, 3), 'rows': (64, 64, 4, 3), 'dense': (64, 64, 4, 3), 'values': (64, 64, 4, 3)},
    ('float32-tf32', 128, 512): {'fwd': (64, 64, 8, 3), 'rows': (64, 64, 8, 3), 'dense': (64, 64, 8, 3), 'values': (64, 64, 8, 3)},
    ('float32-tf32', 128, 1024): {'fwd': (64, 64, 8, 3), 'rows': (64, 64, 8, 3), 'dense': (64, 64, 8, 3), 'values': (64, 64, 8, 3)},
    ('float32-tf32', 128, None): {'fwd': (64, 64, 8, 3), 'rows': (64, 64, 8, 3), 'dense': (64, 64, 8, 3), 'values': (64, 64, 8, 3)},
    ('float32', 16, 512): {'fwd': (64, 32, 4, 3), 'rows': (64, 32, 4, 3), 'dense': (16, 32, 4, 3), 'values': (32, 32, 8, 3)},
    ('float32', 16, 1024): {'fwd': (64, 32, 4, 3), 'rows': (64, 32, 4, 3), 'dense': (16, 32, 4, 3), 'values': (32, 32, 8, 3)},
    ('float32', 16, None): {'fwd': (64, 32, 4, 3), 'rows': (64, 32, 4, 3), 'dense': (16, 32, 4, 3), 'values': (32, 32, 8, 3)},
    ('float32', 32, 512): {'fwd': (64, 32, 4, 3), 'rows': (64, 32, 4, 3), 'dense': (16, 32, 4, 3), 'values': (32, 32, 8, 3)},
    ('float32', 32, 1024): {'fwd': (64, 32, 4, 3), 'rows': (64, 32, 4, 3), 'dense': (16, 32, 4, 3), 'values': (32, 32, 8, 3)},
    ('float32', 32, None): {'fwd': (64, 32, 4, 3), 'rows': (64, 32, 4, 3), 'dense': (16, 32, 4, 3), 'values': (32, 32, 8, 3)},
    ('float32', 64, 512): {'fwd': (64, 32, 8, 3), 'rows': (64, 32, 8, 3), 'dense': (16, 32, 4, 3), 'values': (32, 32, 8, 3)},
    ('float32', 64, 1024): {'fwd': (64, 32, 8, 3), 'rows': (64, 32, 8, 3), 'dense': (16, 32, 4, 3), 'values': (32, 32, 8, 3)},
    ('float32', 64, None): {'fwd': (64, 32, 8, 3), 'rows': (64, 32, 8, 3), 'dense': (16, 32, 4, 3), 'values': (32, 32, 8, 3)},
    ('float32', 128, 512): {'fwd': (64, 32, 8, 3), 'rows': (64, 32, 8, 3), 'dense': (16, 32, 4, 3), 'values': (32, 32, 8, 3)},
    ('float32', 128, 1024): {'fwd': (64, 32, 8, 3), 'rows': (64, 32, 8, 3), 'dense': (16, 32, 4, 3), 'values': (32, 32, 8, 3)},
    ('float32', 128, None): {'fwd': (64, 32, 8, 3), 'rows': (64, 32, 8, 3), 'dense': (16, 32, 4, 3), 'values': (32, 32, 8, 3)},
}
