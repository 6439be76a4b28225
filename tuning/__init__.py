"""Build-time work that runs engines: calibration recording for int8/fp8 and the CPU tuner behind
`sprintrt build --backend auto`. It sits above both the builders (engines/) and the runtime, which
never import it."""
