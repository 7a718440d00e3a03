"""kata-container-trace: LTTng traces of container runs through the agent."""
