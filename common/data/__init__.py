from common.data.synthetic import (  # noqa: F401  (synthetic phantoms: tests, CI, the demo)
    abdomen_ct_phantom,
    brain_mri_phantom,
    chest_xray_phantom,
    skin_lesion_phantom,
    write_phantom_dataset,
)
