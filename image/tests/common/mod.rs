//! What the image crate's integration tests share: a disk with a FAT boot
//! partition and a Linux partition behind an MBR or a GPT, as a golden image
//! has them.

use std::io::{Read, Seek, Write};

use edgebind_image::Scheme;

/// Write a partition table onto `disk`: partition 1 the boot partition
/// (FAT32 LBA on an MBR, the EFI system partition type on a GPT), partition
/// 2 Linux. Ranges are (first sector, sectors) of 512 bytes.
pub fn write_table<D: Read + Write + Seek>(
    disk: &mut D,
    scheme: Scheme,
    boot: (u64, u64),
    linux: (u64, u64),
) {
    match scheme {
        Scheme::Mbr => {
            let mut mbr = mbrman::MBR::new_from(disk, 512, [1, 2, 3, 4]).unwrap();
            for (i, (start, len), sys) in [(1usize, boot, 0x0cu8), (2, linux, 0x83)] {
                mbr[i] = mbrman::MBRPartitionEntry {
                    boot: mbrman::BOOT_INACTIVE,
                    first_chs: mbrman::CHS::empty(),
                    sys,
                    last_chs: mbrman::CHS::empty(),
                    starting_lba: start as u32,
                    sectors: len as u32,
                };
            }
            mbr.write_into(disk).unwrap();
        }
        Scheme::Gpt => {
            let mut gpt = gptman::GPT::new_from(disk, 512, [7; 16]).unwrap();
            let esp = *b"\x28\x73\x2a\xc1\x1f\xf8\xd2\x11\xba\x4b\x00\xa0\xc9\x3e\xc9\x3b";
            let linux_fs = *b"\xaf\x3d\xc6\x0f\x83\x84\x72\x47\x8e\x79\x3d\x69\xd8\x47\x7d\xe4";
            for (i, (start, len), kind) in [(1u32, boot, esp), (2, linux, linux_fs)] {
                gpt[i] = gptman::GPTPartitionEntry {
                    partition_type_guid: kind,
                    unique_partition_guid: [i as u8; 16],
                    starting_lba: start,
                    ending_lba: start + len - 1,
                    attribute_bits: 0,
                    partition_name: "part".into(),
                };
            }
            gptman::GPT::write_protective_mbr_into(disk, 512).unwrap();
            gpt.write_into(disk).unwrap();
        }
    }
}
