"""retrieval on CT and MR: pair and class level, with chance levels."""

from medvl.eval.tasks.retrieval import retrieval_task


def test_retrieval_pair_and_class_level(ct, mr):
    for encoder, data, relevance in (ct + ("identical finding sets",), mr + ("same contrast category",)):
        result = retrieval_task(encoder, data)
        assert result["class_relevance"] == relevance
        for direction in ("volume_to_text", "text_to_volume", "volume_to_text_class", "text_to_volume_class"):
            r = result[direction]
            assert set(r) == {"R@1", "R@5", "R@10", "MedR", "mAP", "n_queries", "n_excluded"}
            assert r["n_queries"] == len(data) and r["R@1"] <= r["R@5"] <= r["R@10"] <= 1
            assert 1 <= r["MedR"] <= len(data) and 0 < r["mAP"] <= 1
        assert 0 < result["chance_R@1"]["pair"] <= result["chance_R@1"]["class"] <= 1
