"""What an answer says in words: the decision-support notice every answer carries, and what a
"no tumor found" answer says and leaves out."""

DISCLAIMER = (
    "Decision support only, not a diagnosis: the prediction is derived from similar archive cases "
    "and must be reviewed by a qualified clinician."
)

NO_TUMOR_NOTE = (
    "No tumor found on this slice. The archive's answer is about tumor type only, so none is given; "
    "the most similar archive cases are shown as context."
)
REGION_NO_TUMOR_NOTE = (
    "No tumor found in the drawn region. The archive's answer is about tumor type only, so none is given; "
    "the cases most similar to the region are shown as context."
)
#: what a "no tumor found" answer leaves out: every claim about a tumor type
NO_TYPE = {
    "prediction": None,
    "confidence": None,
    "calibrated": False,
    "calibration_applies": False,
    "probabilities": None,
    "prediction_set": None,
    "coverage": None,
    "neighbours_disagree": False,
    "nir_positions": None,
    "knn_vote": None,
    "nearest_other_class": None,
    "note": NO_TUMOR_NOTE,
    "presence_warning": None,
    "no_close_tumor_case": None,
}


def uncertain_presence(evidence: dict) -> str:
    """What an answer says where the presence rule's score calls the slice "no tumor" and only a
    decoder's veto keeps it a tumor (``evidence["uncertain"]``, :meth:`PresenceRule.answer`): the
    tumor decoder's where its veto held, else the decoder the rule reads."""
    if evidence.get("tumor_veto") is not None and evidence["tumor_decoder_peak"] >= evidence["tumor_veto"]:
        name, peak, veto = "tumor decoder", evidence["tumor_decoder_peak"], evidence["tumor_veto"]
    else:
        name, peak, veto = (
            f"{evidence.get('decoder', 'tumor')} decoder",
            evidence["decoder_peak"],
            evidence["decoder_veto"],
        )
    return (
        "Tumor presence uncertain: the archive's cases with and without a tumor point to no tumor "
        f"(probability of no tumor {evidence['probability_no_tumor']:.0%}), but the {name}'s highest "
        f"probability on the slice is {peak:.0%} (from {veto:.0%} a slice "
        "is never called 'no tumor'). The tumor type below holds only if the outlined region is a tumor: check it."
    )


def distant_evidence(reach: dict) -> str:
    """What an answer says where its nearest cases of a tumor type all lie farther than the
    calibration's held-out queries' did (:meth:`neurocbir.classify.reach.EvidenceReach.check`)."""
    return (
        f"No close tumor case: the {reach['rank']} nearest archive cases of a tumor type lie up to "
        f"{reach['distance']:.3f} away, farther than for 99% of the held-out scans the confidence was "
        f"calibrated on ({reach['threshold']:.3f}). The tumor type below is these cases' vote, not a "
        "calibrated answer, and no type is ruled out: read the retrieved cases."
    )
