"""The code-set ValueSets (fhir_profiles/valuesets) and their loader (cards/codes.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from fhir.resources.R4B.valueset import ValueSet

from cards.codes import (
    FHIR_PROFILES_DIR,
    ICD10,
    ICD10CM,
    LOINC,
    RXNORM,
    SNOMED,
    TEXT_MATCH_EXTENSION_URL,
    VERIFICATION_EXTENSION_URL,
    VERIFICATION_STATUSES,
    CodeSet,
    CodeSetError,
    all_code_sets,
    code_set,
    load_code_sets,
)

REPO_DIR = Path(__file__).resolve().parents[1]
VALUESETS_DIR = FHIR_PROFILES_DIR / "valuesets"
VALUESET_FILES = sorted(VALUESETS_DIR.glob("ValueSet-*.json"))

EXPECTED_NAMES = {
    # drugs
    "Ganciclovir",
    "Valganciclovir",
    "Foscarnet",
    "Cidofovir",
    "Probenecid",
    "ImipenemCilastatin",
    "Mycophenolate",
    "Zidovudine",
    "Didanosine",
    "MyelosuppressiveDrugs",
    "NephrotoxicDrugs",
    "Immunosuppressants",
    # observations
    "BodyWeight",
    "BodyHeight",
    "SerumCreatinine",
    "NeutrophilCount",
    "PlateletCount",
    "Hemoglobin",
    "LeukocyteCount",
    "UrineProtein",
    "PregnancyTest",
    "CmvViralLoadIU",
    "CmvViralLoadLog10IU",
    "CmvViralLoadCopies",
    "CmvDnaQualitative",
    "Potassium",
    "Magnesium",
    "Calcium",
    "Phosphate",
    # conditions
    "CmvInfection",
    "CmvPneumonitis",
    "CmvRetinitis",
    "CmvGastrointestinal",
    "CmvCns",
    "CmvHepatitis",
    "OrganTransplant",
    "HivInfection",
    "DialysisDependence",
    "Pregnancy",
    "Malabsorption",
    "SevereSeverity",
    "DisseminatedIntravascularCoagulation",
    "CmvResistance",
}

# The status each code should carry, read independently from the public sources the ValueSets cite (the
# research behind docs/codes.md): a change of status in a file fails here until this reading changes too.
EXPECTED_STATUS: dict[tuple[str, str], str] = {
    # RxNorm: product codes FDA listings attach to the products; no ingredient code was confirmed by NLM.
    (RXNORM, "4678"): "1-SRC",
    (RXNORM, "310442"): "VERIFIED-openFDA",
    (RXNORM, "1999531"): "VERIFIED-openFDA",
    (RXNORM, "275891"): "UNVERIFIED",
    (RXNORM, "313566"): "VERIFIED-openFDA",
    (RXNORM, "863559"): "VERIFIED-openFDA",
    (RXNORM, "284587"): "VERIFIED-openFDA",
    (RXNORM, "863562"): "VERIFIED-openFDA",
    (RXNORM, "4571"): "UNVERIFIED",
    (RXNORM, "1734377"): "VERIFIED-openFDA",
    (RXNORM, "855613"): "VERIFIED-openFDA",
    (RXNORM, "16763"): "UNVERIFIED",
    (RXNORM, "199388"): "VERIFIED-openFDA",
    (RXNORM, "8698"): "1-SRC",
    (RXNORM, "198152"): "VERIFIED-openFDA",
    # LOINC
    (LOINC, "29463-7"): "VERIFIED-2+",
    (LOINC, "3141-9"): "VERIFIED-2+",
    (LOINC, "3142-7"): "VERIFIED",
    (LOINC, "8350-1"): "VERIFIED",
    (LOINC, "8351-9"): "VERIFIED",
    (LOINC, "8302-2"): "VERIFIED-2+",
    (LOINC, "3137-7"): "VERIFIED-2+",
    (LOINC, "3138-5"): "VERIFIED-2+",
    (LOINC, "8306-3"): "VERIFIED-2+",
    (LOINC, "8308-9"): "VERIFIED",
    (LOINC, "2160-0"): "VERIFIED-2+",
    (LOINC, "14682-9"): "VERIFIED-2+",
    (LOINC, "77140-2"): "VERIFIED-2+",
    (LOINC, "38483-4"): "VERIFIED-2+",
    (LOINC, "21232-4"): "VERIFIED-2+",
    (LOINC, "59826-8"): "1-SRC",
    (LOINC, "751-8"): "VERIFIED-2+",
    (LOINC, "753-4"): "1-SRC",
    (LOINC, "26499-4"): "VERIFIED-2+",
    (LOINC, "777-3"): "VERIFIED-2+",
    (LOINC, "26515-7"): "VERIFIED-2+",
    (LOINC, "778-1"): "VERIFIED-2+",
    (LOINC, "718-7"): "VERIFIED-2+",
    (LOINC, "20509-6"): "VERIFIED-2+",
    (LOINC, "30350-3"): "VERIFIED-2+",
    (LOINC, "30313-1"): "VERIFIED-2+",
    (LOINC, "30351-1"): "VERIFIED-2+",
    (LOINC, "30352-9"): "1-SRC",
    (LOINC, "6690-2"): "VERIFIED-2+",
    (LOINC, "2888-6"): "VERIFIED-2+",
    (LOINC, "5804-0"): "VERIFIED-2+",
    (LOINC, "50561-0"): "1-SRC",
    (LOINC, "20454-5"): "VERIFIED-2+",
    (LOINC, "2887-8"): "1-SRC",
    (LOINC, "57735-3"): "1-SRC",
    (LOINC, "2106-3"): "VERIFIED-2+",
    (LOINC, "2118-8"): "VERIFIED",  # two copies of one VSAC value set: one authority
    (LOINC, "19080-1"): "VERIFIED",
    (LOINC, "72493-0"): "VERIFIED-2+",
    (LOINC, "100675-8"): "VERIFIED-2+",
    (LOINC, "100676-6"): "1-SRC",
    (LOINC, "72494-8"): "VERIFIED-2+",
    (LOINC, "29604-6"): "VERIFIED-2+",
    (LOINC, "30247-1"): "1-SRC",
    (LOINC, "33006-8"): "1-SRC",
    (LOINC, "4996-5"): "VERIFIED-2+",
    (LOINC, "2823-3"): "VERIFIED-2+",
    (LOINC, "19123-9"): "VERIFIED-2+",
    (LOINC, "17861-6"): "VERIFIED-2+",
    (LOINC, "2777-1"): "1-SRC",
    # SNOMED CT, ICD-10, ICD-10-CM
    (SNOMED, "28944009"): "VERIFIED-2+",
    (SNOMED, "7678002"): "UNVERIFIED",
    (SNOMED, "22455005"): "1-SRC",
    (SNOMED, "161663000"): "VERIFIED",
    (SNOMED, "86406008"): "VERIFIED",
    (SNOMED, "105502003"): "VERIFIED",
    (SNOMED, "443143006"): "UNVERIFIED",
    (SNOMED, "428982002"): "UNVERIFIED",
    (SNOMED, "24484000"): "VERIFIED-2+",
    (SNOMED, "77386006"): "VERIFIED-2+",
    (SNOMED, "67406007"): "VERIFIED",
    (ICD10, "Z99.2"): "UNVERIFIED",
    (ICD10CM, "Z99.2"): "VERIFIED-2+",
    (ICD10, "B25.9"): "VERIFIED",
    (ICD10CM, "B25.9"): "VERIFIED-2+",
    (ICD10, "B25.0"): "VERIFIED",
    (ICD10CM, "B25.0"): "VERIFIED-2+",
    (ICD10, "B25.1"): "VERIFIED",
    (ICD10CM, "B25.1"): "VERIFIED-2+",
    (ICD10, "D65"): "1-SRC",
    (ICD10CM, "D65"): "VERIFIED-2+",
}


def _load(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def _file_concepts() -> list[tuple[str, str, str, str]]:
    """(file name, system, code, status) for every concept in every file."""
    out: list[tuple[str, str, str, str]] = []
    for path in VALUESET_FILES:
        for include in _load(path).get("compose", {}).get("include", []):
            for concept in include["concept"]:
                statuses = [e["valueCode"] for e in concept["extension"] if e["url"] == VERIFICATION_EXTENSION_URL]
                assert len(statuses) == 1, (path.name, concept["code"])
                out.append((path.name, include["system"], concept["code"], statuses[0]))
    return out


# ------------------------------------------------------------------------------------ the files


def test_one_file_per_expected_set() -> None:
    assert {p.name for p in VALUESET_FILES} == {f"ValueSet-{n}.json" for n in EXPECTED_NAMES}
    assert set(all_code_sets()) == EXPECTED_NAMES


@pytest.mark.parametrize("path", VALUESET_FILES, ids=lambda p: p.name)
def test_file_is_a_valid_r4_valueset(path: Path) -> None:
    data = _load(path)
    model = ValueSet.model_validate(data)
    assert model.status == "active"
    assert model.name == path.name.removeprefix("ValueSet-").removesuffix(".json")
    assert re.fullmatch(r"[A-Z][A-Za-z0-9]*", data["name"])
    assert re.fullmatch(r"[a-z0-9]+(?:-[a-z0-9]+)*", data["id"])
    assert data["url"] == f"http://fhir.cmv-cds.org/ValueSet/{data['id']}"
    assert data["title"]
    assert re.search(r"docs/(clinical-basis|policy)\.md §\d", data["description"]), "description must cite its section"
    # Tidy JSON: 2-space indent, as json.dumps writes it.
    assert path.read_text(encoding="utf-8") == json.dumps(data, indent=2, ensure_ascii=False) + "\n"


@pytest.mark.parametrize("path", VALUESET_FILES, ids=lambda p: p.name)
def test_concepts_and_patterns_are_well_formed(path: Path) -> None:
    data = _load(path)
    systems = [inc["system"] for inc in data.get("compose", {}).get("include", [])]
    assert len(systems) == len(set(systems)), "one include per system"
    assert set(systems) <= {RXNORM, LOINC, SNOMED, ICD10, ICD10CM}
    for include in data.get("compose", {}).get("include", []):
        for concept in include["concept"]:
            assert concept["code"]
            assert concept["display"]
            statuses = [e["valueCode"] for e in concept["extension"] if e["url"] == VERIFICATION_EXTENSION_URL]
            assert len(statuses) == 1
            assert statuses[0] in VERIFICATION_STATUSES
    patterns = [e["valueString"] for e in data.get("extension", []) if e["url"] == TEXT_MATCH_EXTENSION_URL]
    assert all(p == p.lower().strip() and p for p in patterns)
    assert systems or patterns, "a set needs codes or patterns"


def test_icd_codes_are_listed_under_both_icd_systems() -> None:
    for cs in all_code_sets().values():
        assert cs.codes(ICD10) == cs.codes(ICD10CM), cs.name


def test_every_status_is_the_expected_one() -> None:
    seen = {(system, code): status for _f, system, code, status in _file_concepts()}
    assert seen == EXPECTED_STATUS


def test_every_code_names_its_public_sources() -> None:
    """A verified code carries the URLs it was seen at (two or more distinct ones for VERIFIED-2+); an unverified
    code carries none (docs/clinical-basis.md §9)."""
    for code_set_ in all_code_sets().values():
        for concept in code_set_.concepts:
            where = (code_set_.name, concept.code)
            assert all(url.startswith(("https://", "http://")) for url in concept.sources), where
            assert len(set(concept.sources)) == len(concept.sources), where
            if concept.verification == "UNVERIFIED":
                assert concept.sources == (), where
            else:
                assert concept.sources, where
            if concept.verification == "VERIFIED-2+":
                assert len(concept.sources) >= 2, where


def test_the_service_never_writes_an_unverified_code() -> None:
    """Proposals are coded only with verified codes (docs/policy.md §13)."""
    from cards import fhir_out

    for set_name in ("Ganciclovir", "Valganciclovir", "Foscarnet", "Cidofovir", "Probenecid"):
        coded = fhir_out.verified_rxnorm(set_name)
        assert coded is not None, set_name
        assert coded.verification.startswith("VERIFIED"), set_name


@pytest.mark.parametrize(
    ("name", "system", "code", "status"),
    [
        ("Ganciclovir", RXNORM, "4678", "1-SRC"),
        ("Valganciclovir", RXNORM, "313566", "VERIFIED-openFDA"),
        ("CmvPneumonitis", SNOMED, "7678002", "UNVERIFIED"),
        ("CmvViralLoadIU", LOINC, "72493-0", "VERIFIED-2+"),
        ("Probenecid", RXNORM, "198152", "VERIFIED-openFDA"),
        ("NeutrophilCount", LOINC, "753-4", "1-SRC"),
        ("Pregnancy", SNOMED, "77386006", "VERIFIED-2+"),
        ("SevereSeverity", SNOMED, "24484000", "VERIFIED-2+"),
        ("SerumCreatinine", LOINC, "38483-4", "VERIFIED-2+"),
        ("UrineProtein", LOINC, "5804-0", "VERIFIED-2+"),
    ],
)
def test_status_spot_checks(name: str, system: str, code: str, status: str) -> None:
    concepts = [c for c in code_set(name).concepts if (c.system, c.code) == (system, code)]
    assert len(concepts) == 1
    assert concepts[0].verification == status


def test_bal_viral_load_is_not_a_blood_viral_load() -> None:
    for cs in all_code_sets().values():
        assert not cs.has_coding(LOINC, "49349-4"), cs.name
    assert code_set("CmvViralLoadCopies").codes(LOINC) == ("29604-6", "33006-8", "30247-1")


def test_codes_in_file_order() -> None:
    assert code_set("Valganciclovir").codes(RXNORM) == ("275891", "313566", "863559", "284587", "863562")
    assert code_set("DialysisDependence").codes(SNOMED) == ("105502003", "443143006", "428982002")
    assert code_set("DialysisDependence").codes(ICD10CM) == ("Z99.2",)
    assert code_set("Mycophenolate").codes(RXNORM) == ()


# ------------------------------------------------------------------------------------ matching


def _cc(text: str | None = None, *codings: dict[str, Any]) -> dict[str, Any]:
    concept: dict[str, Any] = {"coding": list(codings)}
    if text is not None:
        concept["text"] = text
    return concept


def test_valganciclovir_text_is_not_ganciclovir() -> None:
    concept = _cc("Valganciclovir 450 MG Oral Tablet")
    assert code_set("Valganciclovir").matches_concept(concept)
    assert not code_set("Ganciclovir").matches_concept(concept)
    assert not code_set("Ganciclovir").matches_text("VALGANCICLOVIR")
    assert not code_set("Ganciclovir").matches_concept({"coding": [{"display": "valganciclovir"}]})


def test_ganciclovir_text() -> None:
    assert code_set("Ganciclovir").matches_concept(_cc("ganciclovir 500 mg IV"))
    assert code_set("Ganciclovir").matches_text("Cytovene-IV 500 mg")
    assert not code_set("Valganciclovir").matches_text("ganciclovir 500 mg IV")


def test_display_matches() -> None:
    concept = {"coding": [{"system": "urn:local", "code": "x1", "display": "Foscavir 24 mg/mL"}]}
    assert code_set("Foscarnet").matches_concept(concept)
    assert not code_set("Foscarnet").matches_coding_only(concept)


def test_coding_only() -> None:
    coded = _cc(None, {"system": RXNORM, "code": "313566"})
    assert code_set("Valganciclovir").matches_coding_only(coded)
    assert code_set("Valganciclovir").matches_concept(coded)
    assert not code_set("Ganciclovir").matches_coding_only(coded)
    text_only = _cc("valganciclovir 450 mg tablet", {"system": RXNORM, "code": "999999", "display": "valcyte"})
    assert not code_set("Valganciclovir").matches_coding_only(text_only)
    assert code_set("Valganciclovir").matches_concept(text_only)
    # The right code in the wrong system is not a match.
    assert not code_set("Valganciclovir").matches_coding_only(_cc(None, {"system": LOINC, "code": "313566"}))
    assert not code_set("Valganciclovir").has_coding(None, "313566")


def test_coding_variants_from_ehrs() -> None:
    assert code_set("Valganciclovir").has_coding("urn:oid:2.16.840.1.113883.6.88", "313566")
    assert code_set("SerumCreatinine").has_coding(LOINC, " 2160-0 ")
    assert code_set("CmvInfection").has_coding(ICD10CM, "B259")
    assert code_set("CmvInfection").has_coding(ICD10, "b25.9")
    assert not code_set("CmvInfection").has_coding(ICD10CM, "B25.0")
    assert not code_set("CmvInfection").has_coding(SNOMED, "B25.9")


MALFORMED: list[object] = [
    None,
    [],
    "ganciclovir",
    5,
    {},
    {"coding": "x"},
    {"coding": [1, None]},
    {"coding": {"system": RXNORM, "code": "313566"}},
    {"coding": [{"system": 5, "code": ["313566"], "display": 7}]},
    {"coding": [{"system": RXNORM, "code": 313566}]},
    {"coding": None, "text": None},
    {"text": 5},
    {"text": ["valganciclovir"]},
]


@pytest.mark.parametrize("concept", MALFORMED, ids=repr)
def test_malformed_input_never_matches_nor_raises(concept: object) -> None:
    for cs in all_code_sets().values():
        assert cs.matches_concept(concept) is False
        assert cs.matches_coding_only(concept) is False


def test_malformed_scalars() -> None:
    cs = code_set("Valganciclovir")
    assert cs.matches_text(None) is False
    assert cs.matches_text(5) is False
    assert cs.matches_text("") is False
    assert cs.has_coding(None, None) is False
    assert cs.has_coding(RXNORM, 313566) is False


def test_manifestation_text_needs_cmv_elsewhere() -> None:
    ulcerative = _cc("Ulcerative colitis")
    assert code_set("CmvGastrointestinal").matches_concept(ulcerative)
    assert not code_set("CmvInfection").matches_concept(ulcerative)
    cmv_colitis = _cc("CMV colitis")
    assert code_set("CmvGastrointestinal").matches_concept(cmv_colitis)
    assert code_set("CmvInfection").matches_concept(cmv_colitis)


def test_whole_words_and_phrases() -> None:
    assert code_set("CmvCns").matches_text("CMV disease of the CNS")
    assert not code_set("CmvCns").matches_text("cnsx")
    assert code_set("Malabsorption").matches_text("Patient is NPO")
    assert code_set("Malabsorption").matches_text("Nil  by\nmouth")
    assert code_set("SevereSeverity").matches_text("Life-threatening")
    assert code_set("SevereSeverity").matches_text("Severe")
    assert not code_set("SevereSeverity").matches_text("Moderate to severely")
    assert code_set("CmvInfection").matches_text("Cytomegaloviral disease")
    assert not code_set("CmvInfection").matches_text("HCMVX")
    assert code_set("MyelosuppressiveDrugs").matches_text("Trimethoprim-Sulfamethoxazole 800-160 mg")
    assert code_set("MyelosuppressiveDrugs").matches_text("Amphotericin B liposome")
    assert not code_set("MyelosuppressiveDrugs").matches_text("amphotericin")
    assert code_set("NephrotoxicDrugs").matches_text("Ibuprofen 400 mg")
    assert code_set("NephrotoxicDrugs").matches_text("NSAIDs")


def test_conservative_lab_patterns() -> None:
    assert code_set("SerumCreatinine").matches_text("Serum creatinine")
    assert not code_set("SerumCreatinine").matches_text("Creatinine [Mass/volume] in Urine")
    assert code_set("SerumCreatinine").matches_text("Creatinine [Mass/volume] in Serum or Plasma")
    assert not code_set("Hemoglobin").matches_text("Hemoglobin A1c")
    assert not code_set("NeutrophilCount").matches_text("Neutrophils/100 leukocytes in Blood")
    assert code_set("NeutrophilCount").matches_text("ANC")
    for name in ("CmvViralLoadIU", "CmvViralLoadLog10IU", "CmvViralLoadCopies"):
        assert code_set(name).matches_text("CMV DNA PCR, plasma")
        assert not code_set(name).matches_text("CMV IgG")


def test_pattern_only_sets_have_no_codes() -> None:
    for name in ("ImipenemCilastatin", "Mycophenolate", "CmvGastrointestinal", "CmvCns", "Malabsorption"):
        cs = code_set(name)
        assert cs.concepts == ()
        assert cs.text_patterns
        assert not cs.matches_coding_only(_cc(None, {"system": RXNORM, "code": "4678"}))


# ------------------------------------------------------------------------------------ the loader


def test_code_set_is_cached_and_unknown_names_raise() -> None:
    assert code_set("Ganciclovir") is code_set("Ganciclovir")
    assert isinstance(code_set("Ganciclovir"), CodeSet)
    with pytest.raises(KeyError, match="NoSuchSet"):
        code_set("NoSuchSet")


def test_all_code_sets_returns_a_copy() -> None:
    sets = all_code_sets()
    sets.pop("Ganciclovir")
    assert "Ganciclovir" in all_code_sets()


def test_fhir_profiles_dir() -> None:
    assert FHIR_PROFILES_DIR == REPO_DIR / "fhir_profiles"
    assert VALUESETS_DIR.is_dir()


def _write(directory: Path, name: str, resource: object) -> None:
    (directory / f"ValueSet-{name}.json").write_text(json.dumps(resource), encoding="utf-8")


def _minimal(name: str = "Foo", rid: str = "foo") -> dict[str, Any]:
    return {
        "resourceType": "ValueSet",
        "id": rid,
        "url": f"http://fhir.cmv-cds.org/ValueSet/{rid}",
        "name": name,
        "status": "active",
        "extension": [{"url": TEXT_MATCH_EXTENSION_URL, "valueString": "foo"}],
    }


def test_loader_accepts_a_minimal_file(tmp_path: Path) -> None:
    _write(tmp_path, "Foo", _minimal())
    sets = load_code_sets(tmp_path)
    assert sets["Foo"].text_patterns == ("foo",)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"resourceType": "CodeSystem"}, "resourceType"),
        ({"name": None}, "name"),
        ({"name": "Bar"}, "file name"),
        ({"url": "http://example.org/foo"}, "url"),
        ({"extension": [{"url": TEXT_MATCH_EXTENSION_URL, "valueString": "Foo"}]}, "lower-case"),
        ({"extension": []}, "neither codes nor"),
        (
            {"compose": {"include": [{"system": LOINC, "concept": [{"code": "1-1", "display": "x"}]}]}},
            "verification",
        ),
        (
            {
                "compose": {
                    "include": [
                        {
                            "system": LOINC,
                            "concept": [
                                {
                                    "code": "1-1",
                                    "display": "x",
                                    "extension": [{"url": VERIFICATION_EXTENSION_URL, "valueCode": "MAYBE"}],
                                }
                            ],
                        }
                    ]
                }
            },
            "verification",
        ),
    ],
)
def test_loader_rejects_bad_files(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    _write(tmp_path, "Foo", _minimal() | change)
    with pytest.raises(CodeSetError, match=message) as info:
        load_code_sets(tmp_path)
    assert "ValueSet-Foo.json" in str(info.value)


def test_loader_rejects_invalid_json_and_duplicate_urls(tmp_path: Path) -> None:
    (tmp_path / "ValueSet-Foo.json").write_text("{", encoding="utf-8")
    with pytest.raises(CodeSetError, match="JSON"):
        load_code_sets(tmp_path)
    _write(tmp_path, "Foo", _minimal())
    _write(tmp_path, "Bar", _minimal(name="Bar", rid="foo"))
    with pytest.raises(CodeSetError, match="duplicate ValueSet url"):
        load_code_sets(tmp_path)


def test_loader_rejects_an_empty_directory(tmp_path: Path) -> None:
    with pytest.raises(CodeSetError, match="no ValueSet"):
        load_code_sets(tmp_path)
