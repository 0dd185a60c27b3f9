"""Pure library for susceptibility studies: models, data, SGLD, streaming statistics, estimators, analysis."""
