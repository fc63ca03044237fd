"""
snq's XMPP client side, on wokkel (all wokkel imports stay in this package).
"""
