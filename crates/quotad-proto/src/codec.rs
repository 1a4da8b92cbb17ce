//! The codec the generated servers use (build.rs sets it with `codec_path`):
//! tonic's prost codec, except that a request body that is not a valid
//! protobuf message is the caller's bad input, INVALID_ARGUMENT, not the
//! INTERNAL that tonic-prost answers (it follows grpc's status-code table,
//! which files a failed parse under INTERNAL, so that an INTERNAL from us
//! would wrongly say the server is broken and invite a retry of the same bytes).
//! Nothing is decoded, so nothing reaches the services or changes state.
//!
//! The generated clients keep tonic's own codec: a response they cannot
//! decode is the server's fault, and stays INTERNAL.

use std::marker::PhantomData;

use prost::{Message, Name};
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic::Status;
use tonic_prost::{ProstCodec, ProstEncoder};

/// Encodes `T` (a response) exactly as [`ProstCodec`] does; decodes `U` (a
/// request) as it does too, with the error above.
#[derive(Debug, Clone)]
pub struct ValidatingCodec<T, U> {
    prost: ProstCodec<T, U>,
}

impl<T, U> Default for ValidatingCodec<T, U> {
    fn default() -> Self {
        Self {
            prost: ProstCodec::default(),
        }
    }
}

impl<T, U> Codec for ValidatingCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Name + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ValidatingDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.prost.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        ValidatingDecoder {
            _message: PhantomData,
        }
    }
}

/// Decodes a `U` with prost, as tonic-prost's decoder does. It calls prost
/// itself rather than wrapping that decoder, so that it remaps prost's
/// `DecodeError` and nothing else: any other status (a message over the size
/// limit, a broken stream) comes from tonic, outside the codec, unchanged.
#[derive(Debug, Clone)]
pub struct ValidatingDecoder<U> {
    _message: PhantomData<U>,
}

impl<U: Message + Name + Default> Decoder for ValidatingDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        U::decode(buf).map(Some).map_err(undecodable::<U>)
    }

    fn buffer_settings(&self) -> BufferSettings {
        // The same (default) settings as tonic-prost's decoder.
        BufferSettings::default()
    }
}

/// "the request could not be decoded as quotad.v1.ConsumeRequest: failed to
/// decode Protobuf message: ConsumeRequest.school_id: invalid string value: ..."
fn undecodable<U: Name>(error: prost::DecodeError) -> Status {
    Status::invalid_argument(format!(
        "the request could not be decoded as {}: {error}",
        U::full_name()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, PartialEq, Message)]
    struct Probe {
        #[prost(string, tag = "1")]
        name: String,
    }

    impl Name for Probe {
        const NAME: &'static str = "Probe";
        const PACKAGE: &'static str = "quotad.test";
    }

    #[test]
    fn an_undecodable_message_is_invalid_argument_naming_its_type() {
        let error = Probe::decode(&[0x0a, 0x02, 0xc3, 0x28][..]).expect_err("not UTF-8");
        let status = undecodable::<Probe>(error);
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(
            status
                .message()
                .starts_with("the request could not be decoded as quotad.test.Probe: "),
            "{}",
            status.message()
        );
        assert!(status.message().contains("UTF-8"), "{}", status.message());
    }
}
