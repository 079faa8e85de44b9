"""Wave physics: the simulator, the data misfit, the sea-floor picker, waveform inversion."""
