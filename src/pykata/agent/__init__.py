"""kata-agent: the guest agent."""
