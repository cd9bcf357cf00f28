# The Wallaroo side of the Celsius example (Python API, connector protocol v3).
# The sidecars in connectors.yaml play the two connectors declared here.
import struct

import wallaroo
import wallaroo.experimental


@wallaroo.experimental.stream_message_decoder
def decode_feed(data):
    # The udp source hands each datagram over byte for byte: a big-endian f32.
    return struct.unpack(">f", data)[0]


@wallaroo.experimental.stream_message_encoder
def encode_feed(data):
    return data


@wallaroo.experimental.octet_message_encoder
def encode_conversion(data):
    # octet encoder: the sink receives exactly these bytes (no legacy 16-byte header).
    return ("%.1f\n" % data).encode()


@wallaroo.experimental.stream_message_decoder
def decode_conversion(data):
    return data.decode()


@wallaroo.computation(name="multiply by 1.8")
def multiply(data):
    return data * 1.8


@wallaroo.computation(name="add 32")
def add(data):
    return data + 32


def application_setup(args):
    feed = wallaroo.experimental.SourceConnectorConfig(
        "celsius_feed", encoder=encode_feed, decoder=decode_feed,
        host="127.0.0.1", port=7100, cookie="Dragons-Love-Tacos",
        max_credits=500, refill_credits=50)
    out = wallaroo.experimental.SinkConnectorConfig(
        "fahrenheit_conversion", encoder=encode_conversion, decoder=decode_conversion,
        host="127.0.0.1", port=7200, cookie="Dragons-Love-Tacos")
    pipeline = (wallaroo.source("convert temperature readings", feed)
                .to(multiply)
                .to(add)
                .to_sink(out))
    return wallaroo.build_application("Celsius to Fahrenheit", pipeline)
