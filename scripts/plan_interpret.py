"""The fused device-plan, localise, layout and scatter kernels against the torch paths in the Triton interpreter (no GPU):
TRITON_INTERPRET=1 python scripts/plan_interpret.py"""

import itertools

from tests.test_kernels import check_plan_kernel

for (T, R, rank), (dis, over, bad) in itertools.product(
    [(0, 2, 0), (1, 1, 0), (37, 2, 1), (1500, 3, 2), (300, 8, 7)],
    [(False, False, False), (True, False, False), (False, True, False), (False, False, True)],
):
    check_plan_kernel("cpu", T, R, rank, T * 7 + R, dis, over, bad)
    print("ok", T, R, rank, dis, over, bad, flush=True)

from tests.test_kernels import check_localize_kernel  # noqa: E402

for case in [(0, 8, 0, 4, 0, True), (37, 3, 1, 4, 30, True), (2048, 8, 3, 5, 2048, False), (100, 1, 0, 1, 0, True)]:
    check_localize_kernel("cpu", *case)
    print("ok localize", case, flush=True)

from tests.test_kernels import LAYOUT_CASES, check_layout_kernel  # noqa: E402

for case in LAYOUT_CASES[:-2]:
    check_layout_kernel("cpu", *case)
    print("ok layout", case, flush=True)

from tests.test_kernels import SCATTER_CASES, check_scatter_kernels, check_scatter_kernels_multi  # noqa: E402

for case in SCATTER_CASES[1:]:
    check_scatter_kernels("cpu", *case)
    print("ok scatter", case, flush=True)
for nprog in (1, 7):
    check_scatter_kernels_multi("cpu", nprog)
    print("ok scatter multi", nprog, flush=True)
