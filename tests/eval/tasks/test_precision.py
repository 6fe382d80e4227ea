"""precision (P@R) with findings relevance (CT, three modes) and contrast categories (MR)."""

from medvl.eval.tasks.precision import precision_task
from tests.utils import is_share


def test_precision_ct_findings_and_mr_categories(ct, mr):
    from medvl.data import CT_FINDINGS

    result = precision_task(*ct)
    assert {"P@1", "P@10", "n_queries", "per_class", "macro"} <= set(result) and "P@20" not in result  # 20 > n
    graded = result["by_relevance"]
    assert set(graded) == {"shared", "identical", "jaccard"} and graded["shared"]["P@10"] == result["P@10"]
    # identical sets <= Jaccard-weighted <= share a finding, for the values and for their chance levels
    for key in ("P@1", "P@10", "chance"):
        assert graded["identical"][key] <= graded["jaccard"][key] + 1e-12 <= graded["shared"][key] + 2e-12
    assert set(result["per_class"]) <= set(CT_FINDINGS) | {"normal"}
    assert all(is_share(result[k]) for k in ("P@1", "P@10"))
    result = precision_task(*mr)
    assert {"P@1", "P@10", "P@20"} <= set(result) and result["n_queries"] == 24
    assert result["relevance"] == "same contrast category"
    assert all(is_share(v["P@1"]) for v in result["per_class"].values())
