pub mod resnet;
pub mod weights;
