"""Where the tests find the original GLM SentencePiece model, which is not ours to commit: $M2_GLM_MODEL, else
../shared/data/glm_sp.model beside the checkout. Tests that need it skip, saying where they looked."""
import os
from pathlib import Path

import pytest

GLM_MODEL = Path(os.environ.get("M2_GLM_MODEL")
                 or Path(__file__).resolve().parents[2] / "shared" / "data" / "glm_sp.model")
needs_glm = pytest.mark.skipif(not GLM_MODEL.exists(),
                               reason=f"GLM SentencePiece model not found at {GLM_MODEL} (set M2_GLM_MODEL)")
