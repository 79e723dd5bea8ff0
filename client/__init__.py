"""kvwire client side: SDK and transports."""
