"""Comparing two Detections whose scores may tie: order among near-equal scores is rounding."""


def assert_same_detections(got, want, score_tol: float, box_tol: float):
    """One Detections against another: the same count, and each detection of
    `want` matched by its own detection of `got` with the same category, score
    within score_tol and every box coordinate within box_tol pixels."""
    assert len(got.scores) == len(want.scores), (len(got.scores), len(want.scores))
    free = list(range(len(got.scores)))
    for i in range(len(want.scores)):
        hits = [
            j
            for j in free
            if got.category_ids[j] == want.category_ids[i]
            and abs(float(got.scores[j] - want.scores[i])) <= score_tol
            and float((got.boxes[j] - want.boxes[i]).abs().max()) <= box_tol
        ]
        assert hits, f"no match for {int(want.category_ids[i])} {float(want.scores[i]):.5f} {want.boxes[i].tolist()}"
        free.remove(hits[0])
