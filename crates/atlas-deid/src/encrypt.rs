//! `encrypt`: AES-CBC with PKCS#7 padding and a random IV, written as
//! base64(IV ‖ ciphertext) — the upstream tool's format, so its users can
//! decrypt Atlas's output with their existing keys and code.

use aes::cipher::{BlockDecryptMut, BlockEncryptMut, KeyIvInit, block_padding::Pkcs7};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use rand::RngCore;

const IV: usize = 16;

/// Encrypts `plain` under a 16, 24 or 32 byte key.
pub fn encrypt(plain: &[u8], key: &[u8]) -> Result<String, String> {
    let mut iv = [0u8; IV];
    rand::thread_rng().fill_bytes(&mut iv);
    let cipher = match key.len() {
        16 => cbc::Encryptor::<aes::Aes128>::new_from_slices(key, &iv)
            .map(|c| c.encrypt_padded_vec_mut::<Pkcs7>(plain)),
        24 => cbc::Encryptor::<aes::Aes192>::new_from_slices(key, &iv)
            .map(|c| c.encrypt_padded_vec_mut::<Pkcs7>(plain)),
        32 => cbc::Encryptor::<aes::Aes256>::new_from_slices(key, &iv)
            .map(|c| c.encrypt_padded_vec_mut::<Pkcs7>(plain)),
        n => {
            return Err(format!(
                "encryptKey is {} bits; AES needs 128, 192 or 256",
                n * 8
            ));
        }
    }
    .map_err(|e| e.to_string())?;
    let mut out = Vec::with_capacity(IV + cipher.len());
    out.extend_from_slice(&iv);
    out.extend_from_slice(&cipher);
    Ok(STANDARD.encode(out))
}

/// Decrypts what [`encrypt`] wrote.
pub fn decrypt(text: &str, key: &[u8]) -> Result<String, String> {
    let bytes = STANDARD.decode(text).map_err(|e| e.to_string())?;
    if bytes.len() < IV {
        return Err(format!("ciphertext shorter than the {IV}-byte IV"));
    }
    let (iv, body) = bytes.split_at(IV);
    let plain = match key.len() {
        16 => cbc::Decryptor::<aes::Aes128>::new_from_slices(key, iv)
            .map(|c| c.decrypt_padded_vec_mut::<Pkcs7>(body)),
        24 => cbc::Decryptor::<aes::Aes192>::new_from_slices(key, iv)
            .map(|c| c.decrypt_padded_vec_mut::<Pkcs7>(body)),
        32 => cbc::Decryptor::<aes::Aes256>::new_from_slices(key, iv)
            .map(|c| c.decrypt_padded_vec_mut::<Pkcs7>(body)),
        n => return Err(format!("a {}-bit key is not an AES key", n * 8)),
    }
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())?;
    String::from_utf8(plain).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    #[test]
    fn round_trip_with_every_key_size() {
        for key in [
            "0123456789abcdef",
            "0123456789abcdef01234567",
            "0123456789abcdef0123456789abcdef",
        ] {
            let c = super::encrypt("Jane Doe".as_bytes(), key.as_bytes()).unwrap();
            assert_ne!(
                c,
                super::encrypt("Jane Doe".as_bytes(), key.as_bytes()).unwrap(),
                "random IV"
            );
            assert_eq!(super::decrypt(&c, key.as_bytes()).unwrap(), "Jane Doe");
        }
        assert!(super::encrypt(b"x", b"short").is_err());
    }
}
