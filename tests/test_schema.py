"""schema: frozen records and validation that names the trial and field."""
import dataclasses

import pytest

from data_pipeline import schema as S


def _trial(**kw):
  t = S.Trial("NCT1", "test", "t", "PHASE2", (), (), 10, "", "", (), (), None)
  return dataclasses.replace(t, **kw)


def test_validate_rejects_bad_fields():
  S.validate_trial(_trial())
  with pytest.raises(S.SchemaError, match="NCT1.*conditions"):
    S.validate_trial(_trial(conditions=["a"]))
  bad_p = S.Analysis(("O1",), 1.5, "=", "", "", None, None, None, None, "")
  o = S.Outcome("x", "", "primary", "", "", "", (), (bad_p,), "unknown")
  with pytest.raises(S.SchemaError, match="p_value"):
    S.validate_trial(_trial(outcomes=(o,)))
  with pytest.raises(dataclasses.FrozenInstanceError):
    _trial().id = "x"
