//! A throwaway CA and leaf certificates (rcgen) for TLS tests.

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};

pub struct Ca {
    pub pem: String,
    params: CertificateParams,
    key: KeyPair,
}

pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: Vec<u8>,
}

impl Ca {
    pub fn new() -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "keygate test CA");
        let key = KeyPair::generate().unwrap();
        let pem = params.self_signed(&key).unwrap().pem();
        Ca { pem, params, key }
    }

    /// A leaf for localhost and 127.0.0.1.
    pub fn leaf(&self) -> Leaf {
        let params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        let key = KeyPair::generate().unwrap();
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
        }
    }
}

/// A fixed 2048-bit RSA test key in PKCS#1 ("BEGIN RSA PRIVATE KEY"): ring, rcgen's backend here,
/// cannot generate RSA keys, and the default test tier must not need openssl.
pub const RSA_PKCS1_PEM: &str = include_str!("test-rsa-pkcs1.key");

/// A self-signed certificate for localhost over `key_pkcs8` (PKCS#8 DER).
pub fn self_signed(key_pkcs8: &[u8], alg: &'static rcgen::SignatureAlgorithm) -> String {
    let der = rustls_pki_types::PrivatePkcs8KeyDer::from(key_pkcs8.to_vec());
    let key = KeyPair::from_pkcs8_der_and_sign_algo(&der, alg).unwrap();
    let params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params.self_signed(&key).unwrap().pem()
}

/// PEM text of `der` under `label`.
pub fn pem(label: &str, der: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::new();
    for chunk in der.chunks(3) {
        let n = chunk.iter().fold(0u32, |n, b| n << 8 | u32::from(*b)) << (8 * (3 - chunk.len()));
        for i in 0..4 {
            b64.push(if i <= chunk.len() {
                ABC[(n >> (18 - 6 * i) & 63) as usize] as char
            } else {
                '='
            });
        }
    }
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// The DER of [`RSA_PKCS1_PEM`].
pub fn rsa_pkcs1_der() -> Vec<u8> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::PrivatePkcs1KeyDer::from_pem_slice(RSA_PKCS1_PEM.as_bytes())
        .unwrap()
        .secret_pkcs1_der()
        .to_vec()
}

fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes: Vec<u8> = len
            .to_be_bytes()
            .into_iter()
            .skip_while(|b| *b == 0)
            .collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend(bytes);
    }
    out.extend_from_slice(content);
    out
}

/// Splits one DER element off `input`: (tag, content, whole element, rest).
fn split(input: &[u8]) -> (u8, &[u8], &[u8], &[u8]) {
    let (tag, first) = (input[0], input[1]);
    let (len, head) = if first < 0x80 {
        (first as usize, 2)
    } else {
        let n = (first & 0x7f) as usize;
        let len = input[2..2 + n]
            .iter()
            .fold(0usize, |l, b| l << 8 | *b as usize);
        (len, 2 + n)
    };
    (
        tag,
        &input[head..head + len],
        &input[..head + len],
        &input[head + len..],
    )
}

/// The SEC1 ("BEGIN EC PRIVATE KEY") form of a P-256 PKCS#8 key, with its curve named as
/// openssl writes it (ring's PKCS#8 leaves the curve to the algorithm identifier).
pub fn sec1_from_pkcs8(p8: &[u8]) -> Vec<u8> {
    let (_, info, _, _) = split(p8);
    let (_, _, _, rest) = split(info); // version
    let (_, _, _, rest) = split(rest); // algorithm
    let (_, inner, _, _) = split(rest); // privateKey OCTET STRING
    let (_, ec, _, _) = split(inner);
    let (_, _, version, rest) = split(ec);
    let (_, _, private, public) = split(rest);
    // [0] { OID 1.2.840.10045.3.1.7 (prime256v1) }
    let curve = tlv(
        0xa0,
        &tlv(0x06, &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07]),
    );
    tlv(0x30, &[version, private, &curve, public].concat())
}

/// The PKCS#8 wrapping of a PKCS#1 RSA key.
pub fn pkcs8_from_pkcs1(p1: &[u8]) -> Vec<u8> {
    // SEQUENCE { OID 1.2.840.113549.1.1.1 (rsaEncryption), NULL }
    let alg = tlv(
        0x30,
        &[
            tlv(
                0x06,
                &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01],
            ),
            vec![0x05, 0x00],
        ]
        .concat(),
    );
    tlv(0x30, &[tlv(0x02, &[0]), alg, tlv(0x04, p1)].concat())
}
