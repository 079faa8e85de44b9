"""The velocity models: inputs as images, source fusion, the EVA02 network, baselines, building."""
