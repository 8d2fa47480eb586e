"""The model side of the pipeline, one module per stage.

data -> schema -> candidates -> evaluation -> gate / registry (MLflow) -> store (BentoML), orchestrated by
`training`; `predict` is what the service and the drift reference share to turn rows into predictions.
"""
