"""The data layer: DICOM series and MR metadata sentences, report entities, MONAI preprocessing,
and synthetic CT/MR phantoms that stand in for real data (none can be downloaded here).

    series = read_dicom_series("path/to/series")          # volume in HU / MR units, spacing, metadata
    text = metadata_to_text(series.metadata)               # MR-CLIP-style acquisition sentence
    entities = extract_entities(report)                    # MedTrim-style disease/adjective/direction sets
    ct, mr = make_phantom_set(n_ct=100, n_mr=100, seed=0)  # phantoms whose image, report and labels agree

The phantom generators live in :mod:`medvl.data.phantoms`; :mod:`medvl.data.sources` turns a source (the
phantoms, a manifest, CT-RATE, a folder of MR NIfTI files) into the dataset training and evaluation read.

Pure Python (numpy, pydicom, MONAI); independent of the kernels.
"""

from medvl.data.ct_rate import ct_rate_records, load_ct_rate_volume, with_ct_rate_volume
from medvl.data.dataset import Sample, VolumeTextDataset, collate
from medvl.data.dicom import MR_METADATA_KEYS, Series, mr_metadata, read_dicom_header, read_dicom_series, \
    read_series_metadata
from medvl.data.dicom_write import write_dicom_series
from medvl.data.entities import ADJECTIVES, CHEXPERT_FINDINGS, CT_RATE_FINDINGS, DIRECTIONS, DISEASES, Entities, \
    entities_to_multihot, extract_entities, load_ontology
from medvl.data.manifest import Manifest, load_manifest, load_volume, read_manifest
from medvl.data.metadata import CORRUPTION_KINDS, DEFAULT_TE_EDGES, DEFAULT_TI_EDGES, DEFAULT_TR_EDGES, \
    contrast_category, contrast_key, corrupt_metadata, metadata_to_text
from medvl.data.nifti_sidecar import mr_nifti_records, read_sidecar
from medvl.data.prompts import PROMPT_TEMPLATES, disease_prompts, sample_prompt
from medvl.data.phantoms import CT_FINDINGS, CTPhantom, Finding, MRPhantom, ct_report, make_ct_phantom, \
    make_mr_phantom, make_phantom_set
from medvl.data.transforms import ct_transforms, mr_transforms, volume_to_metatensor

__all__ = [
    "ADJECTIVES", "CHEXPERT_FINDINGS", "CORRUPTION_KINDS", "CT_FINDINGS", "CT_RATE_FINDINGS", "CTPhantom",
    "DEFAULT_TE_EDGES", "DEFAULT_TI_EDGES", "DEFAULT_TR_EDGES", "DIRECTIONS", "DISEASES", "Entities", "Finding",
    "MRPhantom", "MR_METADATA_KEYS", "PROMPT_TEMPLATES", "Sample", "Series", "VolumeTextDataset", "collate",
    "contrast_category", "contrast_key", "corrupt_metadata", "ct_report", "ct_transforms", "disease_prompts",
    "entities_to_multihot", "extract_entities", "load_ontology", "make_ct_phantom", "make_mr_phantom",
    "make_phantom_set", "metadata_to_text", "mr_metadata", "mr_transforms", "read_dicom_header",
    "read_dicom_series", "read_series_metadata", "sample_prompt", "volume_to_metatensor", "write_dicom_series",
    "Manifest", "ct_rate_records", "load_ct_rate_volume", "load_manifest", "load_volume", "mr_nifti_records",
    "read_manifest", "read_sidecar", "with_ct_rate_volume",
]
